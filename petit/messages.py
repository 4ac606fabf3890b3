"""One-shot JSON exchanges over a WebSocket: registration and unregistration.

The server speaks first with a nonce; the client answers with one request signed over a
transcript binding that nonce and the server certificate; the server sends one reply.
"""

from __future__ import annotations

import base64
import json
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from petit.auth import (
    parse_json_object,
    public_key_raw,
    register_transcript,
    sign,
    unregister_transcript,
)

MAX_MESSAGE: Final = 64 * 1024  # bytes; registration messages are tiny


def encode(document: dict[str, object]) -> str:
    """Serialise one message."""
    return json.dumps(document, separators=(",", ":"))


def decode(message: str | bytes, *, what: str) -> dict[str, object]:
    """Parse one message from the peer (RemoteProtocolError when malformed)."""
    data = message.encode() if isinstance(message, str) else message
    return parse_json_object(data, what=what)


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def register_request(
    key: Ed25519PrivateKey, nonce: bytes, server_fingerprint: bytes, **extra: object
) -> dict[str, object]:
    """A registration of ``key``, signed to prove possession; ``extra`` adds vitae or a token."""
    public = public_key_raw(key)
    signature = sign(key, register_transcript(nonce, server_fingerprint, public))
    return {"type": "register", "public_key": _b64(public), "signature": _b64(signature), **extra}


def unregister_request(
    key: Ed25519PrivateKey, nonce: bytes, server_fingerprint: bytes, registration_id: str
) -> dict[str, object]:
    """An unregistration of ``registration_id``, signed with ``key``."""
    signature = sign(key, unregister_transcript(nonce, server_fingerprint, registration_id))
    return {"type": "unregister", "id": registration_id, "signature": _b64(signature)}
