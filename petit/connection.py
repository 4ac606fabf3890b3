"""The tunnel protocol as a sans-IO state machine (h11/h2 style), so it can be tested byte by byte.

``TunnelConnection`` turns bytes from the peer into events and commands into bytes for the peer.
It never blocks, sleeps, logs or reads the clock; a trio driver runs it over a carrier.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from petit.errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from petit.events import (
    ChallengeReceived,
    ConnectionTerminated,
    DataReceived,
    GoAwayReceived,
    HelloReceived,
    PingReceived,
    PongReceived,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    TunnelEvent,
    Welcomed,
    WindowUpdated,
)
from petit.flow import LARGEST_WINDOW, ReceiveWindow, SendWindow
from petit.frames import MAX_PAYLOAD, Frame, FrameDecoder, FrameType, encode_header

################################################################
# Theory of operation
################################################################
#
# - No I/O: receive_data() turns peer bytes into events, commands queue frames, data_to_send()
#   drains them. Randomness (the challenge nonce) comes from the caller.
# - Rule 1: every connection state transition is in _CONNECTION_TRANSITIONS and every stream
#   state transition in _STREAM_TRANSITIONS; nothing else changes a state, except that RESET
#   (either way) closes any stream and a CLOSED connection drops all its streams. An input
#   missing from a table is refused: LocalProtocolError for our own commands (a petit bug),
#   RemoteProtocolError for the peer's frames.
# - Rule 2: the stream table is symmetric; its inputs say only whether *we* sent (SEND_*) or
#   *they* sent (RECV_*). Which role may send OPEN (server) and ACCEPT (client) is _ONLY_SENT_BY.
# - Until the handshake reaches OPEN only CHALLENGE, HELLO, WELCOME and GOAWAY may arrive;
#   anything else is refused with code AUTH. GOAWAY before OPEN closes the connection.
# - The server opens streams with odd, increasing ids. Closed streams leave the table; frames
#   for an id opened before (they raced the close) are ignored, frames for an id never opened
#   are fatal (STREAM_CLOSED). After our GOAWAY, OPENs that raced it are refused with RESET.
# - Any RemoteProtocolError is fatal: the connection goes CLOSED, a GOAWAY carrying exc.code is
#   queued, and later input is ignored.
# - Flow control is per stream and per direction. Windows are asymmetric and negotiated: each
#   side announces in its handshake document (HELLO, WELCOME) the receive window it offers per
#   stream, and the driver hands the peer's announcement to settle_windows() before any stream
#   is accepted. A peer that announces nothing is an old one that assumes DEFAULT_WINDOW both
#   ways, so it gets exactly that, whatever we offered. Credit comes back by WINDOW_UPDATE once
#   the application acknowledges the bytes it consumed (petit.flow batches them).
# - Windows grow with the link (as HTTP/2 and QUIC stacks auto-tune): while DATA arrives we
#   send our own PING (a BDP probe, opaque _BDP_PROBE + a counter) and count, per stream, the
#   DATA bytes the application consumed until its PONG: one round trip. A stream whose reader
#   took 2/3 of its receive window in that round trip was limited by the window, not by the
#   link or its reader: its window grows fourfold, to DEFAULT_WINDOW at least and MAX_WINDOW
#   at most, the extra granted at once by a WINDOW_UPDATE. The window a round trip is judged
#   by is the one before the previous growth, whose extra only reaches the peer during that
#   round trip: so a stream keeping up grows every round trip (not every other one), and
#   overshoots its need by one step at most. A slow or absent reader takes little, so its
#   window never grows. No clock: a round trip is measured in bytes. A new probe waits for
#   _PROBE_SPACING bytes of DATA.
# - Bytes the application consumed may still wait below it: in the send queue of the socket
#   it relays them into, which the kernel grows to megabytes for a caller that reads slowly.
#   Filling that queue looks like a fast reader, and windows grown then would keep growth
#   budget from streams that need it while the slow reader lives. So the driver tells the
#   connection how to read that queue (``backlog_of``: stream id -> bytes), and what a
#   window-limited round trip added to it does not count as read. Only streams that were
#   window-limited are asked (at a PONG, and at the next probe): the cost is per round trip
#   of a bulk stream, never per message.
# - Memory bound: what the peer can make us buffer is what we granted, so received-but-unread
#   bytes on one connection stay within live streams x initial receive window +
#   WINDOW_GROWTH_BUDGET (the growth of all its streams together), whatever the peer does.
#   Hence a server offers a small window: it pays for a stream nobody reads only that, and
#   streams whose reader keeps up grow to the link's speed.
# - Frames the peer's input makes us queue (PONG, a refusal) count in reply_backlog until
#   drained; the driver stops reading while it is past a bound, so a flood costs the flooder.

# The path of the original's tunnel check, ``GET /-g2c-intercept``.
PROBE: Final = "/-g2c-intercept"
# Bytes of credit per stream, each way, that a peer announcing no window assumes (the
# protocol before windows were negotiated), and what a connection offers unless told otherwise.
DEFAULT_WINDOW: Final = 1024 * 1024
# Bytes a server offers per stream: all that a public caller who never reads costs it, while
# the streams of callers who keep up grow (see the memory bound above).
SERVER_WINDOW: Final = 64 * 1024
MAX_WINDOW: Final = 16 * 1024 * 1024  # bytes: the most a stream's receive window grows to
# Bytes of growth, all streams of a connection together: one stream can reach MAX_WINDOW. Also
# what a peer gets by having its callers read fast, then stop (kernel buffers filling look like
# a fast reader), so it is most of the memory bound: 64 MiB let 200 unread streams cost 70 MB.
WINDOW_GROWTH_BUDGET: Final = MAX_WINDOW
_BDP_PROBE: Final = b"bdp"  # opaque prefix of our own PINGs that measure one round trip
_PROBE_SPACING: Final = 16 * 1024  # DATA bytes received before a BDP probe: a trickle is not
# worth measuring; small enough that a probe goes out early in a stream's first window
_LARGEST_STREAM_ID: Final = 2**32 - 1  # the u32 stream_id field
_UNBOUNDED: Final = 2**32 - 1  # the u32 length field: only max_payload limits the payload
_U32: Final = struct.Struct("!I")


def _nothing_queued(stream_id: int) -> int:
    """The backlog below an application whose driver keeps none: always empty."""
    return 0


class StreamKind(enum.Enum):
    """What a stream carries, as its OPEN target says after the registration ID."""

    HTTP = ""  # requests from the ingress
    PROBE = PROBE  # the tunnel check: the client answers it itself, never its private service
    TCP = "/tcp"  # a connection to the registration's raw TCP port: bytes as they come


def stream_target(registration_id: str, kind: StreamKind = StreamKind.HTTP) -> str:
    """The OPEN target of a ``kind`` stream for ``registration_id``."""
    return registration_id + kind.value


def split_target(target: str) -> tuple[str, StreamKind]:
    """(registration ID, what the stream carries) of an OPEN's target. Anything after the
    ID that names no kind exactly is plain HTTP: never a check or a raw TCP stream."""
    for kind in (StreamKind.PROBE, StreamKind.TCP):
        if target.endswith(kind.value):
            return target.removesuffix(kind.value), kind
    return target.partition("/")[0], StreamKind.HTTP


class Role(enum.Enum):
    """Which end of the tunnel we are: the server opens streams, the client accepts them."""

    CLIENT = enum.auto()
    SERVER = enum.auto()


class ConnectionState(enum.Enum):
    """Where the handshake (or the connection) stands."""

    START = enum.auto()  # (server) nothing sent yet
    AWAITING_HELLO = enum.auto()  # (server) CHALLENGE sent
    VERIFYING = enum.auto()  # (server) HELLO received; the driver checks it
    AWAITING_CHALLENGE = enum.auto()  # (client) nothing received yet
    SIGNING = enum.auto()  # (client) CHALLENGE received; the driver builds the HELLO
    AWAITING_WELCOME = enum.auto()  # (client) HELLO sent
    OPEN = enum.auto()
    CLOSED = enum.auto()


class StreamState(enum.Enum):
    """Where one stream stands."""

    OPENING = enum.auto()  # OPEN sent or received, not yet ACCEPTed
    OPEN = enum.auto()
    HALF_CLOSED_LOCAL = enum.auto()  # we sent END; they may still send DATA
    HALF_CLOSED_REMOTE = enum.auto()  # they sent END; we may still send DATA
    CLOSED = enum.auto()


class _ConnectionInput(enum.Enum):
    SEND_CHALLENGE = enum.auto()
    RECV_CHALLENGE = enum.auto()
    SEND_HELLO = enum.auto()
    RECV_HELLO = enum.auto()
    SEND_WELCOME = enum.auto()
    RECV_WELCOME = enum.auto()
    SEND_GOAWAY = enum.auto()
    RECV_GOAWAY = enum.auto()
    CLOSE = enum.auto()  # we close, the carrier ended, or the peer broke the protocol


class StreamInput(enum.Enum):
    """What happened on a stream: SEND_* we did, RECV_* the peer did."""

    SEND_ACCEPT = enum.auto()
    RECV_ACCEPT = enum.auto()
    SEND_DATA = enum.auto()
    RECV_DATA = enum.auto()
    SEND_END = enum.auto()
    RECV_END = enum.auto()


_HANDSHAKE_STATES: Final[Mapping[Role, tuple[ConnectionState, ...]]] = {
    Role.SERVER: (
        ConnectionState.START,
        ConnectionState.AWAITING_HELLO,
        ConnectionState.VERIFYING,
    ),
    Role.CLIENT: (
        ConnectionState.AWAITING_CHALLENGE,
        ConnectionState.SIGNING,
        ConnectionState.AWAITING_WELCOME,
    ),
}
_GOAWAYS: Final = (_ConnectionInput.SEND_GOAWAY, _ConnectionInput.RECV_GOAWAY)

_CONNECTION_TRANSITIONS: Final[
    Mapping[tuple[Role, ConnectionState, _ConnectionInput], ConnectionState]
] = {
    (Role.SERVER, ConnectionState.START, _ConnectionInput.SEND_CHALLENGE): (
        ConnectionState.AWAITING_HELLO
    ),
    (Role.SERVER, ConnectionState.AWAITING_HELLO, _ConnectionInput.RECV_HELLO): (
        ConnectionState.VERIFYING
    ),
    (Role.SERVER, ConnectionState.VERIFYING, _ConnectionInput.SEND_WELCOME): ConnectionState.OPEN,
    (Role.CLIENT, ConnectionState.AWAITING_CHALLENGE, _ConnectionInput.RECV_CHALLENGE): (
        ConnectionState.SIGNING
    ),
    (Role.CLIENT, ConnectionState.SIGNING, _ConnectionInput.SEND_HELLO): (
        ConnectionState.AWAITING_WELCOME
    ),
    (Role.CLIENT, ConnectionState.AWAITING_WELCOME, _ConnectionInput.RECV_WELCOME): (
        ConnectionState.OPEN
    ),
    # GOAWAY while OPEN drains the streams; before OPEN there is nothing to drain, so it closes.
    **{
        (role, ConnectionState.OPEN, goaway): ConnectionState.OPEN
        for role in Role
        for goaway in _GOAWAYS
    },
    **{
        (role, state, goaway): ConnectionState.CLOSED
        for role, states in _HANDSHAKE_STATES.items()
        for state in states
        for goaway in _GOAWAYS
    },
    **{
        (role, state, _ConnectionInput.CLOSE): ConnectionState.CLOSED
        for role, states in _HANDSHAKE_STATES.items()
        for state in (*states, ConnectionState.OPEN)
    },
}

_STREAM_TRANSITIONS: Final[Mapping[tuple[StreamState, StreamInput], StreamState]] = {
    (StreamState.OPENING, StreamInput.SEND_ACCEPT): StreamState.OPEN,
    (StreamState.OPENING, StreamInput.RECV_ACCEPT): StreamState.OPEN,
    (StreamState.OPEN, StreamInput.SEND_DATA): StreamState.OPEN,
    (StreamState.OPEN, StreamInput.RECV_DATA): StreamState.OPEN,
    (StreamState.OPEN, StreamInput.SEND_END): StreamState.HALF_CLOSED_LOCAL,
    (StreamState.OPEN, StreamInput.RECV_END): StreamState.HALF_CLOSED_REMOTE,
    (StreamState.HALF_CLOSED_LOCAL, StreamInput.RECV_DATA): StreamState.HALF_CLOSED_LOCAL,
    (StreamState.HALF_CLOSED_LOCAL, StreamInput.RECV_END): StreamState.CLOSED,
    (StreamState.HALF_CLOSED_REMOTE, StreamInput.SEND_DATA): StreamState.HALF_CLOSED_REMOTE,
    (StreamState.HALF_CLOSED_REMOTE, StreamInput.SEND_END): StreamState.CLOSED,
}

_HANDSHAKE_RECEIVED: Final[
    Mapping[FrameType, tuple[_ConnectionInput, Callable[[bytes], TunnelEvent]]]
] = {
    FrameType.CHALLENGE: (_ConnectionInput.RECV_CHALLENGE, ChallengeReceived),
    FrameType.HELLO: (_ConnectionInput.RECV_HELLO, HelloReceived),
    FrameType.WELCOME: (_ConnectionInput.RECV_WELCOME, Welcomed),
}

_ONLY_SENT_BY: Final[Mapping[FrameType, Role]] = {
    FrameType.OPEN: Role.SERVER,
    FrameType.ACCEPT: Role.CLIENT,
}
_CONNECTION_FRAMES: Final = frozenset(
    {
        FrameType.CHALLENGE,
        FrameType.HELLO,
        FrameType.WELCOME,
        FrameType.PING,
        FrameType.PONG,
        FrameType.GOAWAY,
    }
)  # on stream 0; every other type names a stream
_ALLOWED_BEFORE_OPEN: Final = frozenset(
    {FrameType.CHALLENGE, FrameType.HELLO, FrameType.WELCOME, FrameType.GOAWAY}
)
# Payload size bounds (inclusive, bytes), checked on what the peer sends and on what the caller
# hands us to send.
_PAYLOAD_SIZES: Final[Mapping[FrameType, tuple[int, int]]] = {
    FrameType.CHALLENGE: (16, 64),
    FrameType.HELLO: (0, _UNBOUNDED),
    FrameType.WELCOME: (0, _UNBOUNDED),
    FrameType.OPEN: (1, 64),
    FrameType.ACCEPT: (0, 0),
    FrameType.DATA: (1, _UNBOUNDED),
    FrameType.END: (0, 0),
    FrameType.RESET: (_U32.size, _U32.size),
    FrameType.WINDOW_UPDATE: (_U32.size, _U32.size),
    FrameType.PING: (8, 8),
    FrameType.PONG: (8, 8),
    FrameType.GOAWAY: (_U32.size, _UNBOUNDED),
}


def _refusal(
    input_: _ConnectionInput | StreamInput, message: str, code: ErrorCode
) -> ProtocolError:
    """Blame the peer for a RECV_* input and ourselves for any other."""
    error = RemoteProtocolError if input_.name.startswith("RECV_") else LocalProtocolError
    return error(message, code=code)


@dataclass(slots=True)
class _Stream:
    stream_id: int
    state: StreamState
    send_window: SendWindow
    receive_window: ReceiveWindow
    probe_sample: int = 0  # DATA bytes consumed since the BDP probe in flight was sent
    # The receive window the round trip in progress runs on: growth granted at the last PONG
    # reaches the peer, and its DATA us, only as the next PONG does.
    measured_window: int = 0
    # Bytes of consumed DATA still queued below the application when the probe in flight was
    # sent, or None when it was not read: only for a stream window-limited in the round trip
    # before, the others start from 0 (an under-estimate of what it drains: no growth unearned).
    backlog_at_probe: int | None = None


@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    """Counters of one connection since it was created."""

    open_streams: int  # streams not yet closed, in any state
    data_bytes_sent: int  # DATA payload bytes
    data_bytes_received: int
    frames_sent: int  # frames of every type
    frames_received: int
    window_growth: int  # bytes the live streams' receive windows grew beyond the initial one


class TunnelConnection:
    """The complete state of one tunnel, with no I/O.

    Feed it bytes with ``receive_data()`` and act on the events it returns; tell it what you
    want with the command methods; after every call, write ``data_to_send()`` to the carrier.
    Commands raise LocalProtocolError when the protocol forbids them right now.
    """

    def __init__(
        self, role: Role, *, offered_window: int = DEFAULT_WINDOW, max_payload: int = MAX_PAYLOAD
    ) -> None:
        """``offered_window``: the receive window per stream we announce to the peer; until
        ``settle_windows()`` both windows are DEFAULT_WINDOW, as every peer assumes."""
        assert 0 < offered_window <= LARGEST_WINDOW
        assert max_payload > _U32.size
        self._role = role
        self._peer_role = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        self._state = _HANDSHAKE_STATES[role][0]
        self.offered_window = offered_window
        self._receive_window = DEFAULT_WINDOW  # initial credit per stream we grant the peer
        self._send_window = DEFAULT_WINDOW  # initial credit per stream the peer grants us
        self._windows_in_use = False  # a stream was accepted: settle_windows() is too late
        self._max_payload = max_payload
        self._decoder = FrameDecoder(max_payload)
        # Queued frames as (header, payload, reply size), joined once by data_to_send(). A
        # DATA payload from an immutable buffer is queued as a view of it: copied once on its
        # way out. Reply size: the frame's bytes if the peer's input made us queue it (a PONG,
        # a refusal), else 0; their sum is reply_backlog.
        self._outgoing: deque[tuple[bytes, bytes | memoryview, int]] = deque()
        self._reply_backlog = 0
        self._queued_bytes = 0  # bytes in _outgoing: frames queued for the peer, not yet drained
        self._streams: dict[int, _Stream] = {}
        self._highest_stream_id = 0
        self._draining = False  # we sent GOAWAY: no new streams
        self._peer_goaway: GoAwayReceived | None = None
        self._window_growth = 0  # bytes the live streams' receive windows grew in all
        self._probe: bytes | None = None  # the BDP probe in flight
        # Bytes of a stream's consumed DATA still queued below the application (set by the
        # driver; nothing is known to be queued until it says how to read it).
        self.backlog_of: Callable[[int], int] = _nothing_queued
        self._probes_sent = 0
        self._since_probe = 0  # DATA bytes received since the last probe was answered
        self._data_bytes_sent = 0
        self._data_bytes_received = 0
        self._frames_sent = 0
        self._frames_received = 0
        self._connection_handlers: Mapping[FrameType, Callable[[Frame], TunnelEvent | None]] = {
            FrameType.CHALLENGE: self._on_handshake,
            FrameType.HELLO: self._on_handshake,
            FrameType.WELCOME: self._on_handshake,
            FrameType.OPEN: self._on_open,
            FrameType.PING: self._on_ping,
            FrameType.PONG: self._on_pong,
            FrameType.GOAWAY: self._on_goaway,
        }
        self._stream_handlers: Mapping[FrameType, Callable[[_Stream, Frame], TunnelEvent]] = {
            FrameType.ACCEPT: self._on_accept,
            FrameType.DATA: self._on_data,
            FrameType.END: self._on_end,
            FrameType.RESET: self._on_reset,
            FrameType.WINDOW_UPDATE: self._on_window_update,
        }

    @property
    def role(self) -> Role:
        return self._role

    @property
    def state(self) -> ConnectionState:
        return self._state

    # Inbound.

    def receive_data(self, data: bytes) -> list[TunnelEvent]:
        """Process bytes from the peer and return the events they carry, in order.

        ``b""`` means the carrier hit EOF: the result is ``[ConnectionTerminated(...)]`` (with
        the code of the peer's GOAWAY, or PROTOCOL if it sent none) and the state is CLOSED.
        Once CLOSED, input is ignored and the result is ``[]``.

        Raises:
            RemoteProtocolError: the peer broke the protocol (FlowControlError: it overran a
                window). The connection is then CLOSED, the events of this call are lost, and
                a GOAWAY carrying ``exc.code`` and the message is waiting in ``data_to_send()``.
        """
        if self._state is ConnectionState.CLOSED:
            return []
        if not data:
            self._transition(_ConnectionInput.CLOSE)
            if self._peer_goaway is None:
                return [ConnectionTerminated(ErrorCode.PROTOCOL, "carrier closed without GOAWAY")]
            return [ConnectionTerminated(self._peer_goaway.code, self._peer_goaway.reason)]
        self._decoder.feed(data)
        events: list[TunnelEvent] = []
        try:
            while (frame := self._decoder.next_frame()) is not None:
                self._frames_received += 1
                event = self._receive_frame(frame)
                if event is not None:
                    events.append(event)
                if self.state is ConnectionState.CLOSED:
                    break  # a GOAWAY before OPEN: ignore whatever follows it
        except RemoteProtocolError as exc:
            self._queue_goaway(exc.code, str(exc))
            self._transition(_ConnectionInput.CLOSE)
            raise
        return events

    # Handshake commands.

    def send_challenge(self, nonce: bytes) -> None:
        """(server) Send the nonce (16..64 random bytes) the client must sign."""
        self._send_handshake(_ConnectionInput.SEND_CHALLENGE, Frame(FrameType.CHALLENGE, 0, nonce))

    def send_hello(self, payload: bytes) -> None:
        """(client) Answer the ChallengeReceived with the driver's claims."""
        self._send_handshake(_ConnectionInput.SEND_HELLO, Frame(FrameType.HELLO, 0, payload))

    def send_welcome(self, payload: bytes) -> None:
        """(server) Accept the verified HelloReceived: the connection is OPEN."""
        self._send_handshake(_ConnectionInput.SEND_WELCOME, Frame(FrameType.WELCOME, 0, payload))

    def settle_windows(self, peer_window: int | None) -> None:
        """Adopt the initial windows the handshake agreed: ``peer_window`` is what the peer
        announced as its receive window per stream, None if it announced none (an old peer).

        The client learns the server's window from a WELCOME that OPENs may follow in the same
        bytes: the streams opened meanwhile carried nothing yet, so they take the new windows.

        Raises:
            LocalProtocolError: a stream was accepted already, with the windows in use.
        """
        if self._windows_in_use:
            raise LocalProtocolError("the windows are settled before any stream is accepted")
        assert peer_window is None or 0 < peer_window <= LARGEST_WINDOW
        if peer_window is None:
            self._receive_window = self._send_window = DEFAULT_WINDOW
        else:
            self._receive_window, self._send_window = self.offered_window, peer_window
        for stream in self._streams.values():  # all OPENING: no DATA, no growth yet
            stream.send_window = SendWindow(self._send_window)
            stream.receive_window = ReceiveWindow(self._receive_window)
            stream.measured_window = self._receive_window

    # Stream commands.

    def open_stream(self, target: str) -> int:
        """(server) Open a stream towards registration ``target``; return its id."""
        self._check_sender(FrameType.OPEN, self._role, LocalProtocolError)
        if self._state is not ConnectionState.OPEN:
            raise LocalProtocolError(f"cannot open a stream in connection state {self._state.name}")
        if self._draining:
            raise LocalProtocolError("draining after GOAWAY: no new streams")
        payload = target.encode()
        self._check_payload_size(FrameType.OPEN, len(payload), LocalProtocolError)
        stream_id = self._highest_stream_id + 2 if self._highest_stream_id else 1
        if stream_id > _LARGEST_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted: open a new connection")
        self._highest_stream_id = stream_id
        self._streams[stream_id] = self._new_stream(stream_id)
        self._queue_frame(Frame(FrameType.OPEN, stream_id, payload))
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        """(client) The local target was reached: data may flow on ``stream_id``."""
        self._check_sender(FrameType.ACCEPT, self._role, LocalProtocolError)
        self._advance(self._live_stream(stream_id), StreamInput.SEND_ACCEPT)
        self._windows_in_use = True
        self._queue_frame(Frame(FrameType.ACCEPT, stream_id))

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Queue as much of ``data`` as the stream's send window allows; return the bytes queued.

        Returns 0 when the window is exhausted: wait for WindowUpdated, then send the rest.
        """
        stream = self._live_stream(stream_id)
        self._advance(stream, StreamInput.SEND_DATA)
        view = memoryview(data).cast("B")
        immutable = isinstance(view.obj, bytes)  # else the caller may reuse its buffer
        size = min(len(view), stream.send_window.available)
        stream.send_window.consume(size)
        for start in range(0, size, self._max_payload):
            chunk = view[start : min(start + self._max_payload, size)]
            header = encode_header(FrameType.DATA, stream_id, len(chunk))
            self._outgoing.append((header, chunk if immutable else bytes(chunk), 0))
            self._queued_bytes += len(header) + len(chunk)
            self._frames_sent += 1
        self._data_bytes_sent += size
        return size

    def end_stream(self, stream_id: int) -> None:
        """Half-close ``stream_id``: we will send no more DATA on it."""
        self._advance(self._live_stream(stream_id), StreamInput.SEND_END)
        self._queue_frame(Frame(FrameType.END, stream_id))

    def reset_stream(self, stream_id: int, code: ErrorCode = ErrorCode.CANCEL) -> None:
        """Abort ``stream_id`` both ways; a no-op if it is already gone."""
        stream = self._find_stream(stream_id, LocalProtocolError)
        if stream is None:
            return
        self._forget(stream)
        self._queue_frame(Frame(FrameType.RESET, stream_id, _U32.pack(code)))

    def acknowledge_received_data(self, stream_id: int, size: int) -> None:
        """The application consumed ``size`` received bytes: return credit to the peer in batches.

        A no-op if the stream is already gone.
        """
        stream = self._find_stream(stream_id, LocalProtocolError)
        if stream is None:
            return
        if self._probe is not None:
            stream.probe_sample += size
        increment = stream.receive_window.data_consumed(size)
        if increment:
            self._queue_frame(Frame(FrameType.WINDOW_UPDATE, stream_id, _U32.pack(increment)))

    # Connection commands.

    def ping(self, opaque: bytes) -> None:
        """Send a PING carrying 8 ``opaque`` bytes; the peer's PONG comes back as PongReceived."""
        if self._state is not ConnectionState.OPEN:
            raise LocalProtocolError(f"cannot ping in connection state {self._state.name}")
        self._check_payload_size(FrameType.PING, len(opaque), LocalProtocolError)
        self._queue_frame(Frame(FrameType.PING, 0, opaque))

    def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Queue a GOAWAY and close at once; a no-op once CLOSED."""
        if self._state is ConnectionState.CLOSED:
            return
        self._queue_goaway(code, reason)
        self._transition(_ConnectionInput.CLOSE)

    def go_away(self, code: ErrorCode = ErrorCode.SHUTDOWN, reason: str = "") -> None:
        """Queue a GOAWAY but let the live streams finish; no new stream is opened or accepted.

        Before the handshake completes there is nothing to drain, so this closes. A no-op
        once CLOSED.
        """
        if self._state is ConnectionState.CLOSED:
            return
        self._transition(_ConnectionInput.SEND_GOAWAY)
        self._queue_goaway(code, reason)
        self._draining = True

    # Outbound bytes and introspection.

    @property
    def has_data_to_send(self) -> bool:
        """Whether frames are queued: lets a driver skip waking its writer for nothing."""
        return bool(self._outgoing)

    @property
    def queued_bytes(self) -> int:
        """Bytes queued for the peer and not yet drained by ``data_to_send``: what a driver
        bounds, since the send windows that limit DATA are the peer's to choose."""
        return self._queued_bytes

    @property
    def reply_backlog(self) -> int:
        """Bytes queued because of the peer's input (PONGs, refusals) and not yet drained.

        A peer that sends PINGs and never reads would grow this without bound: a driver stops
        reading from the peer while it is past its limit, so the peer pays for its own flood.
        """
        return self._reply_backlog

    def data_to_send(self, max_bytes: int | None = None) -> bytes:
        """Drain the bytes queued for the peer (``b""`` if there are none).

        With ``max_bytes``, only whole frames up to that many bytes (at least one frame), so
        a driver can cut its carrier messages at frame boundaries; call again for the rest.
        """
        pieces: list[bytes | memoryview] = []
        size = 0
        while self._outgoing:
            header, payload, reply = self._outgoing[0]
            frame_size = len(header) + len(payload)
            if max_bytes is not None and pieces and size + frame_size > max_bytes:
                break
            self._outgoing.popleft()
            pieces += (header, payload)
            size += frame_size
            self._reply_backlog -= reply
            self._queued_bytes -= frame_size
        return b"".join(pieces)

    def send_window(self, stream_id: int) -> int:
        """Bytes ``send_data()`` may queue on ``stream_id`` right now."""
        return self._live_stream(stream_id).send_window.available

    def stream_state(self, stream_id: int) -> StreamState:
        """State of ``stream_id``: CLOSED once it is gone."""
        stream = self._find_stream(stream_id, LocalProtocolError)
        return StreamState.CLOSED if stream is None else stream.state

    def stream_ids(self) -> tuple[int, ...]:
        """Ids of the live streams, oldest first."""
        return tuple(self._streams)

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(
            open_streams=len(self._streams),
            data_bytes_sent=self._data_bytes_sent,
            data_bytes_received=self._data_bytes_received,
            frames_sent=self._frames_sent,
            frames_received=self._frames_received,
            window_growth=self._window_growth,
        )

    # Transitions.

    def _transition(self, input_: _ConnectionInput) -> None:
        try:
            self._state = _CONNECTION_TRANSITIONS[self._role, self._state, input_]
        except KeyError:
            code = ErrorCode.PROTOCOL if self._state is ConnectionState.OPEN else ErrorCode.AUTH
            raise _refusal(
                input_,
                f"{input_.name} is not allowed in connection state {self._state.name}",
                code,
            ) from None
        if self._state is ConnectionState.CLOSED:
            self._streams.clear()
            self._window_growth = 0

    def _advance(self, stream: _Stream, input_: StreamInput) -> None:
        try:
            stream.state = _STREAM_TRANSITIONS[stream.state, input_]
        except KeyError:
            raise _refusal(
                input_,
                f"{input_.name} is not allowed on stream {stream.stream_id}"
                f" in state {stream.state.name}",
                ErrorCode.STREAM_CLOSED,
            ) from None
        if stream.state is StreamState.CLOSED:
            self._forget(stream)

    def _forget(self, stream: _Stream) -> None:
        """Drop a stream; what its receive window grew returns to the budget."""
        del self._streams[stream.stream_id]
        self._window_growth -= stream.receive_window.size - self._receive_window

    # Checks shared by both directions.

    def _check_sender(
        self,
        frame_type: FrameType,
        sender: Role,
        error: type[LocalProtocolError] | type[RemoteProtocolError],
    ) -> None:
        allowed = _ONLY_SENT_BY.get(frame_type, sender)
        if sender is not allowed:
            raise error(f"only the {allowed.name.lower()} may send {frame_type.name}")

    def _check_payload_size(
        self,
        frame_type: FrameType,
        size: int,
        error: type[LocalProtocolError] | type[RemoteProtocolError],
    ) -> None:
        low, high = _PAYLOAD_SIZES[frame_type]
        high = min(high, self._max_payload)
        if not low <= size <= high:
            raise error(
                f"{frame_type.name} payload of {size} bytes, expected {low}..{high}",
                code=ErrorCode.FRAME_SIZE,
            )

    def _find_stream(
        self, stream_id: int, error: type[LocalProtocolError] | type[RemoteProtocolError]
    ) -> _Stream | None:
        """The live stream, or None if it was opened before and is gone since."""
        stream = self._streams.get(stream_id)
        if stream is None and not (stream_id % 2 == 1 and stream_id <= self._highest_stream_id):
            raise error(f"stream {stream_id} was never opened", code=ErrorCode.STREAM_CLOSED)
        return stream

    def _live_stream(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(
                f"stream {stream_id} is not live", code=ErrorCode.STREAM_CLOSED
            )
        return stream

    def _new_stream(self, stream_id: int) -> _Stream:
        return _Stream(
            stream_id,
            StreamState.OPENING,
            SendWindow(self._send_window),
            ReceiveWindow(self._receive_window),
            measured_window=self._receive_window,
        )

    # Outbound frames.

    def _send_handshake(self, input_: _ConnectionInput, frame: Frame) -> None:
        self._check_payload_size(frame.type, len(frame.payload), LocalProtocolError)
        self._transition(input_)
        self._queue_frame(frame)

    def _queue_frame(self, frame: Frame, *, reply: bool = False) -> None:
        header = encode_header(frame.type, frame.stream_id, len(frame.payload))
        reply_size = len(header) + len(frame.payload) if reply else 0
        self._outgoing.append((header, frame.payload, reply_size))
        self._queued_bytes += len(header) + len(frame.payload)
        self._reply_backlog += reply_size
        self._frames_sent += 1

    def _queue_goaway(self, code: ErrorCode, reason: str) -> None:
        reason_bytes = reason.encode()[: self._max_payload - _U32.size]
        self._queue_frame(Frame(FrameType.GOAWAY, 0, _U32.pack(code) + reason_bytes))

    # Inbound frames.

    def _receive_frame(self, frame: Frame) -> TunnelEvent | None:
        frame_type = frame.type
        if self._state is not ConnectionState.OPEN and frame_type not in _ALLOWED_BEFORE_OPEN:
            raise RemoteProtocolError(
                f"{frame_type.name} before the handshake completed", code=ErrorCode.AUTH
            )
        if (frame.stream_id == 0) != (frame_type in _CONNECTION_FRAMES):
            raise RemoteProtocolError(f"{frame_type.name} frame on stream {frame.stream_id}")
        self._check_sender(frame_type, self._peer_role, RemoteProtocolError)
        self._check_payload_size(frame_type, len(frame.payload), RemoteProtocolError)
        stream_handler = self._stream_handlers.get(frame_type)
        if stream_handler is None:
            return self._connection_handlers[frame_type](frame)
        stream = self._find_stream(frame.stream_id, RemoteProtocolError)
        if stream is None:
            return None  # the frame raced the stream's close
        return stream_handler(stream, frame)

    def _on_handshake(self, frame: Frame) -> TunnelEvent:
        input_, event = _HANDSHAKE_RECEIVED[frame.type]
        self._transition(input_)
        return event(frame.payload)

    def _on_open(self, frame: Frame) -> TunnelEvent | None:
        stream_id = frame.stream_id
        if self._peer_goaway is not None:
            raise RemoteProtocolError(f"OPEN of stream {stream_id} after GOAWAY")
        if stream_id % 2 == 0 or stream_id <= self._highest_stream_id:
            raise RemoteProtocolError(
                f"OPEN of stream {stream_id}: ids must be odd and increasing"
                f" (the last was {self._highest_stream_id})"
            )
        try:
            target = frame.payload.decode()
        except UnicodeDecodeError:
            raise RemoteProtocolError(f"OPEN of stream {stream_id}: target is not UTF-8") from None
        self._highest_stream_id = stream_id
        if self._draining:
            refusal = Frame(FrameType.RESET, stream_id, _U32.pack(ErrorCode.REFUSED))
            self._queue_frame(refusal, reply=True)
            return None
        self._streams[stream_id] = self._new_stream(stream_id)
        return StreamOpened(stream_id, target)

    def _on_accept(self, stream: _Stream, frame: Frame) -> TunnelEvent:
        self._advance(stream, StreamInput.RECV_ACCEPT)
        self._windows_in_use = True
        return StreamAccepted(stream.stream_id)

    def _on_data(self, stream: _Stream, frame: Frame) -> TunnelEvent:
        self._advance(stream, StreamInput.RECV_DATA)
        size = len(frame.payload)
        stream.receive_window.data_received(size)
        self._data_bytes_received += size
        if self._probe is None:
            self._since_probe += size
            if self._since_probe >= _PROBE_SPACING:
                self._probes_sent += 1
                self._probe = _BDP_PROBE + self._probes_sent.to_bytes(5, "big")
                self._queue_frame(Frame(FrameType.PING, 0, self._probe))
                for watched in self._streams.values():
                    if watched.backlog_at_probe is not None:
                        watched.backlog_at_probe = self.backlog_of(watched.stream_id)
        return DataReceived(stream.stream_id, frame.payload)

    def _on_end(self, stream: _Stream, frame: Frame) -> TunnelEvent:
        self._advance(stream, StreamInput.RECV_END)
        return StreamEnded(stream.stream_id)

    def _on_reset(self, stream: _Stream, frame: Frame) -> TunnelEvent:
        self._forget(stream)
        (code,) = _U32.unpack(frame.payload)
        return StreamReset(stream.stream_id, ErrorCode.from_wire(code))

    def _on_window_update(self, stream: _Stream, frame: Frame) -> TunnelEvent:
        (delta,) = _U32.unpack(frame.payload)
        stream.send_window.grant(delta)
        return WindowUpdated(stream.stream_id, delta)

    def _on_ping(self, frame: Frame) -> TunnelEvent:
        self._queue_frame(Frame(FrameType.PONG, 0, frame.payload), reply=True)
        return PingReceived(frame.payload)

    def _on_pong(self, frame: Frame) -> TunnelEvent | None:
        if frame.payload != self._probe:
            return PongReceived(frame.payload)
        self._probe, self._since_probe = None, 0
        for stream in self._streams.values():
            sample, stream.probe_sample = stream.probe_sample, 0
            window = stream.receive_window
            measured, stream.measured_window = stream.measured_window, window.size
            if 3 * sample < 2 * measured:
                stream.backlog_at_probe = None
                continue  # the link or the reader, not the window, limited this round trip
            backlog = self.backlog_of(stream.stream_id)
            queued, stream.backlog_at_probe = backlog - (stream.backlog_at_probe or 0), backlog
            if 3 * (sample - queued) < 2 * measured:
                continue  # a queue below the reader took it: the reader is slower than that
            budget = WINDOW_GROWTH_BUDGET - self._window_growth
            target = min(max(4 * window.size, DEFAULT_WINDOW), MAX_WINDOW)
            if (extra := min(target - window.size, budget)) > 0:
                window.grow(extra)
                self._window_growth += extra
                self._queue_frame(
                    Frame(FrameType.WINDOW_UPDATE, stream.stream_id, _U32.pack(extra))
                )
        return None

    def _on_goaway(self, frame: Frame) -> TunnelEvent:
        self._transition(_ConnectionInput.RECV_GOAWAY)
        (code,) = _U32.unpack_from(frame.payload)
        reason = frame.payload[_U32.size :].decode(errors="replace")
        self._peer_goaway = GoAwayReceived(ErrorCode.from_wire(code), reason)
        return self._peer_goaway
