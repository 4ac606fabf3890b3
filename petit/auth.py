"""Identity proofs for registration and the tunnel handshake (Ed25519, pure functions).

Every proof signs a transcript that binds the server's fresh nonce and the SHA-256 of the
server's TLS certificate, so a signature can be neither replayed on another connection nor
relayed through a man in the middle holding another certificate. The hello transcript also
binds the exact set of claimed IDs, so a claim cannot be widened after signing.

Only the client reads and writes key files; the PEM code (cryptography's serialization
package, 1.3 MB of RSS) is imported there, so the server, which only verifies, never loads it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from petit.errors import AuthError, ErrorCode, RemoteProtocolError
from petit.flow import LARGEST_WINDOW

NONCE_SIZE = 32  # bytes
MAX_CLAIMS = 256  # registrations one session may claim
MAX_WORKERS = 64  # processes of one server (petit_server.workers): sessions a client keeps
MAX_VITAE_ITEMS = 64
_HELLO_CONTEXT = b"petit hello v1\n"
_REGISTER_CONTEXT = b"petit register v1\n"
_UNREGISTER_CONTEXT = b"petit unregister v1\n"


def generate_key() -> Ed25519PrivateKey:
    """Create a new registration key."""
    return Ed25519PrivateKey.generate()


def private_key_to_pem(key: Ed25519PrivateKey) -> bytes:
    """Serialise a private key as unencrypted PKCS#8 PEM (the file itself is mode 0600)."""
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    """Load a key written by ``private_key_to_pem``; AuthError if it is not an Ed25519 key."""
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise AuthError(f"not a readable private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AuthError("the key is not an Ed25519 key")
    return key


def public_key_raw(key: Ed25519PrivateKey) -> bytes:
    """The 32 raw bytes of the public half, as stored in the registry."""
    return key.public_key().public_bytes_raw()


def key_fingerprint(public_raw: bytes) -> str:
    """Short human form of a public key, for status output (never the key itself)."""
    digest = hashlib.sha256(public_raw).hexdigest()
    return "sha256:" + digest[:32]


def _transcript(context: bytes, nonce: bytes, server_fingerprint: bytes, *parts: bytes) -> bytes:
    pieces = [nonce, server_fingerprint, *parts]
    return context + b"".join(len(p).to_bytes(4, "big") + p for p in pieces)


def hello_transcript(nonce: bytes, server_fingerprint: bytes, claimed_ids: Sequence[str]) -> bytes:
    """What each registration key signs to join a session: nonce, server cert, claimed set."""
    ids = ",".join(sorted(set(claimed_ids), key=_id_sort_key)).encode()
    return _transcript(_HELLO_CONTEXT, nonce, server_fingerprint, ids)


def register_transcript(nonce: bytes, server_fingerprint: bytes, public_raw: bytes) -> bytes:
    """What a new key signs to prove possession when it registers."""
    return _transcript(_REGISTER_CONTEXT, nonce, server_fingerprint, public_raw)


def unregister_transcript(nonce: bytes, server_fingerprint: bytes, registration_id: str) -> bytes:
    """What a registration's own key signs to delete that registration."""
    return _transcript(_UNREGISTER_CONTEXT, nonce, server_fingerprint, registration_id.encode())


def sign(key: Ed25519PrivateKey, transcript: bytes) -> bytes:
    """Sign a transcript."""
    return key.sign(transcript)


def verify(public_raw: bytes, signature: bytes, transcript: bytes) -> bool:
    """True only if ``signature`` is ``public_raw``'s signature of ``transcript``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, transcript)
    except (InvalidSignature, ValueError):
        return False
    return True


# The public half of a key whose private half was thrown away: what an unknown ID's proof is
# checked against, so that it costs as much as a known one's and always fails.
NOBODY_KEY = Ed25519PrivateKey.generate().public_key().public_bytes_raw()


def _id_sort_key(registration_id: str) -> tuple[int, str]:
    return (len(registration_id), registration_id)


def is_valid_id(value: str) -> bool:
    """Registration IDs are decimal numbers without a leading zero, at most 12 digits."""
    return value.isascii() and value.isdigit() and len(value) <= 12 and not value.startswith("0")


@dataclass(frozen=True, slots=True)
class Hello:
    """A client's claims: registration ID -> signature over the hello transcript."""

    claims: Mapping[str, bytes]
    vitae: Mapping[str, str] = field(default_factory=dict)
    window: int | None = None  # the client's receive window per stream; None: an old client
    # The server's workers (petit_server.workers) this client already has a session to: one
    # of them answers with a welcome accepting nothing, and keeps no session.
    held_workers: frozenset[int] = frozenset()


def encode_hello(hello: Hello) -> bytes:
    """Serialise a hello for the HELLO frame."""
    document: dict[str, object] = {
        "claims": [
            {"id": rid, "signature": base64.b64encode(sig).decode()}
            for rid, sig in hello.claims.items()
        ],
        "vitae": dict(hello.vitae),
    }
    if hello.window is not None:
        document["window"] = hello.window
    if hello.held_workers:
        document["heldWorkers"] = sorted(hello.held_workers)
    return json.dumps(document, separators=(",", ":")).encode()


def decode_hello(payload: bytes) -> Hello:
    """Parse a HELLO payload. Anything malformed is the client's fault: RemoteProtocolError."""
    document = parse_json_object(payload, what="hello")
    raw_claims = document.get("claims")
    if not isinstance(raw_claims, list) or not 1 <= len(raw_claims) <= MAX_CLAIMS:
        raise RemoteProtocolError(f"hello: 'claims' must list 1 to {MAX_CLAIMS} registrations")
    claims: dict[str, bytes] = {}
    for item in raw_claims:
        if not isinstance(item, dict):
            raise RemoteProtocolError("hello: each claim must be an object")
        rid, signature = item.get("id"), item.get("signature")
        if not isinstance(rid, str) or not is_valid_id(rid) or not isinstance(signature, str):
            raise RemoteProtocolError("hello: each claim needs a numeric 'id' and a 'signature'")
        claims[rid] = b64decode(signature, what="hello signature")
    return Hello(
        claims=claims,
        vitae=decode_vitae(document.get("vitae", {})),
        window=decode_window(document, what="hello"),
        held_workers=_decode_held_workers(document.get("heldWorkers", [])),
    )


def _decode_held_workers(value: object) -> frozenset[int]:
    if (
        not isinstance(value, list)
        or len(value) > MAX_WORKERS
        or not all(type(index) is int and 0 <= index < MAX_WORKERS for index in value)
    ):
        raise RemoteProtocolError(
            f"hello: 'heldWorkers' must list worker indices, 0 to {MAX_WORKERS - 1}"
        )
    return frozenset(value)


def decode_window(document: Mapping[str, object], *, what: str) -> int | None:
    """The receive window per stream a hello or welcome announces; None if it announces none,
    as petit did before windows were negotiated (TunnelConnection.settle_windows)."""
    window = document.get("window")
    if window is None:
        return None
    if type(window) is not int or not 0 < window <= LARGEST_WINDOW:
        raise RemoteProtocolError(f"{what}: 'window' must be a byte count, 1 to {LARGEST_WINDOW}")
    return window


def decode_vitae(value: object) -> dict[str, str]:
    """Vitae are small free-form string facts a client reports about itself."""
    if not isinstance(value, dict) or len(value) > MAX_VITAE_ITEMS:
        raise RemoteProtocolError(f"vitae must be an object of at most {MAX_VITAE_ITEMS} strings")
    vitae: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(item, str | int | float | bool) or len(key) > 64 or len(str(item)) > 256:
            raise RemoteProtocolError(f"vitae item {key[:64]!r} must be a short scalar")
        vitae[key] = str(item)
    return vitae


def accepted_ids(
    hello: Hello,
    nonce: bytes,
    server_fingerprint: bytes,
    public_key_of: Callable[[str], bytes | None],
) -> list[str]:
    """Return exactly the claimed IDs whose signature verifies against the registered key.

    An unknown ID and a wrong signature are treated the same, so the answer does not tell an
    unauthenticated client which IDs exist.
    """
    transcript = hello_transcript(nonce, server_fingerprint, list(hello.claims))
    accepted = []
    for rid, signature in hello.claims.items():
        public_raw = public_key_of(rid)
        # An unknown ID is checked against a key nobody holds: the same work, so the time a
        # hello takes does not tell which IDs exist either.
        if verify(public_raw or NOBODY_KEY, signature, transcript) and public_raw:
            accepted.append(rid)
    return sorted(accepted, key=_id_sort_key)


def parse_json_object(payload: bytes, *, what: str) -> dict[str, object]:
    """Decode a JSON object sent by the peer, or raise RemoteProtocolError naming ``what``."""
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        raise RemoteProtocolError(f"{what}: not valid JSON", code=ErrorCode.PROTOCOL) from None
    if not isinstance(document, dict):
        raise RemoteProtocolError(f"{what}: expected a JSON object")
    return document


def b64decode(value: str, *, what: str) -> bytes:
    """Strict base64 decode of peer input."""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RemoteProtocolError(f"{what}: not valid base64") from None
