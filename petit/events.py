"""Events the sans-IO ``TunnelConnection`` reports; a closed union for exhaustive dispatch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from petit.errors import ErrorCode


@dataclass(frozen=True, slots=True)
class ChallengeReceived:
    """(client) The server sent the nonce the client must sign."""

    nonce: bytes


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """(server) The client sent its claims; the driver verifies them, then accepts or closes."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Welcomed:
    """(client) The server accepted the hello; the session is open."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """(client) The server opened ``stream_id`` towards registration ``target``."""

    stream_id: int
    target: str


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    """(server) The client reached its local target; data may flow on ``stream_id``."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Payload bytes arrived. Call ``acknowledge_received_data()`` once they are consumed."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed ``stream_id``: it will send no more DATA."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer aborted ``stream_id`` (REFUSED when the local target could not be reached)."""

    stream_id: int
    code: ErrorCode


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """The peer granted ``delta`` more bytes of credit on ``stream_id``."""

    stream_id: int
    delta: int


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The peer pinged; the PONG is already queued."""

    opaque: bytes


@dataclass(frozen=True, slots=True)
class PongReceived:
    """The peer answered our ping carrying ``opaque``."""

    opaque: bytes


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer will open nothing more and is going away; in-flight streams may finish."""

    code: ErrorCode
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The carrier reached EOF; the connection is closed."""

    code: ErrorCode
    reason: str


TunnelEvent: TypeAlias = (
    ChallengeReceived
    | HelloReceived
    | Welcomed
    | StreamOpened
    | StreamAccepted
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowUpdated
    | PingReceived
    | PongReceived
    | GoAwayReceived
    | ConnectionTerminated
)
