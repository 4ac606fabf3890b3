"""One-shot JSON exchanges over a WebSocket: registration and unregistration.

The server speaks first with a nonce; the client answers with one request signed over a
transcript binding that nonce and the server certificate; the server sends one reply.
"""

from __future__ import annotations

import json
from typing import Final

from petit.auth import parse_json_object

MAX_MESSAGE: Final = 64 * 1024  # bytes; registration messages are tiny


def encode(document: dict[str, object]) -> str:
    """Serialise one message."""
    return json.dumps(document, separators=(",", ":"))


def decode(message: str | bytes, *, what: str) -> dict[str, object]:
    """Parse one message from the peer (RemoteProtocolError when malformed)."""
    data = message.encode() if isinstance(message, str) else message
    return parse_json_object(data, what=what)
