"""The one trio driver of the sans-IO ``TunnelConnection``: a session over one carrier.

# Theory of operation

- One session = one nursery holding three kinds of task: the reader (``_read_loop``), the
  writer (``_write_loop``), the keepalive, plus (client side) one handler task per stream the
  server opens. When the reader ends, the nursery is cancelled and every stream is broken.
- The reader never awaits a consumer. It feeds bytes into per-stream buffers without
  blocking; memory stays bounded because a stream's buffer never exceeds the receive window
  we granted, and credit is only handed back when the application *consumed* bytes. So the
  bytes a peer can make a session buffer are at most live streams x our initial receive
  window + WINDOW_GROWTH_BUDGET (see petit.connection), besides the chunk each application
  took and holds (a relay blocked on its caller). Pausing the reader instead would let one
  stream nobody reads stall every other stream of the tunnel.
- The windows are negotiated by the owner: it announces ``connection.offered_window`` in its
  hello or welcome and passes the peer's announcement to ``connection.settle_windows`` before
  ``serve``.
- Tasks never send on the carrier themselves: they queue frames on the connection
  (synchronously) and call ``schedule_send``. The reader therefore never blocks on a send
  (two peers blocked sending to each other would deadlock), and frames from many streams are
  batched for free. What a batch of trio's run loop queued is sent right after it, before
  trio waits for I/O (``_SendAtIoWait``, an instrument), when the carrier can take it without
  waiting (``can_send_now``: a WebSocket whose TLS we drive, with nothing left unwritten).
  Otherwise (bytes left for the socket, or a task writing or waiting to write, such as the
  reader answering a WebSocket PING) the writer task (``_write_loop``) is woken: it waits for
  the socket and sends, and from the moment it wakes until its round is done the instrument
  leaves the session to it, so bytes keep their order.
  Sending at the I/O wait instead of waking the writer saves two trips through trio's
  scheduler per message (the wake-up, and the send's checkpoint). A stream's DATA waits for
  send credit and, past ``MAX_SEND_QUEUE`` bytes queued on the session, for the queue to
  drain (at the I/O wait or by the writer): the peer chooses its windows, so they alone
  bound nothing, and one that stops reading costs us at most that queue. Only stream
  senders wait; the reader's replies are bounded by ``MAX_REPLY_BACKLOG`` below.
- Received DATA goes into the stream's buffer, or, while a relay into a socket waits with
  nothing buffered (``TunnelStream.relay_some``), straight into that socket with one
  non-blocking write from the reader; the part the socket cannot take is buffered as usual.
- A stream knows the socket its bytes end in once its reader names it (``drains_into``:
  ``splice`` does for a relay into a socket, the HTTP ingress for its caller's): the
  connection reads that socket's send queue (``backlog_of``) to tell a fast reader from a
  kernel buffer filling in front of a slow one.
- The reader stops reading while the replies the peer's input queued (PONGs, refusals) pass
  ``MAX_REPLY_BACKLOG`` bytes and waits for them to drain: a peer that floods
  PINGs and never reads fills its own socket buffers, not our memory. Only replies count:
  our own DATA is bounded by send windows, and waiting on it could deadlock two peers that
  both have much to send.
- Liveness: any bytes received count. The keepalive pings every ``ping_interval`` and
  declares the tunnel dead once nothing arrived for 1.5 intervals (checked every quarter
  interval), so a dead tunnel is detected within two intervals.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import os
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import trio

from petit import sockio
from petit.connection import TunnelConnection
from petit.errors import (
    AuthError,
    ErrorCode,
    LocalProtocolError,
    PetitError,
    ProtocolError,
    RemoteProtocolError,
    first_leaf,
)
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
from petit.frames import HEADER, MAX_PAYLOAD

log = logging.getLogger("petit.session")

# Bytes per carrier message, cut at frame boundaries: four full DATA frames, what one
# 256 KiB read turns into, so a bulk transfer sends one message per read (cutting at a fixed
# 256 KiB left a 48-byte message after each). Measured side by side on loopback: 64 KiB
# messages cost server and client 5-10% more CPU per MB (per-message overhead in
# trio-websocket outweighs masking in cache); 1 MiB is no better than 256 KiB.
MAX_CARRIER_MESSAGE = 4 * (MAX_PAYLOAD + HEADER.size)
RECEIVE_CHUNK = 256 * 1024  # bytes handed to a reader per receive_some by default
CLOSE_GRACE = 1.0  # seconds an ending session gives the send in progress and its last frames
MAX_REPLY_BACKLOG = 64 * 1024  # bytes of queued replies to the peer before we stop reading it
# Bytes queued for the peer (all streams) past which a stream's sender waits for the writer:
# the peer chooses our send windows (up to 2 GiB a stream), so they bound nothing it cannot
# lift, and a peer that stops reading would otherwise have us hold all it granted.
MAX_SEND_QUEUE = 1024 * 1024


def _ignore(size: int) -> None:
    """A byte count nobody keeps."""


@runtime_checkable
class Drained(Protocol):
    """A stream that can be told the socket its received bytes are written into (a tunnel
    stream, or a wrapper of one): see ``TunnelStream.drains_into``."""

    def drains_into(self, sock: trio.socket.SocketType) -> None:
        """Name the socket this stream's bytes are written into."""


class Carrier(Protocol):
    """A reliable, ordered byte transport for frames (a WebSocket, or any trio stream)."""

    async def send(self, data: bytes) -> None:
        """Send bytes; raise trio.BrokenResourceError if the transport died."""

    @property
    def can_send_now(self) -> bool:
        """Whether ``send_now`` may be called now (never, for a carrier without it)."""

    def send_now(self, data: bytes) -> None:
        """Send bytes without yielding; what the transport cannot take waits for ``flush``."""

    async def flush(self) -> None:
        """Wait until what ``send_now`` left behind is written."""

    async def receive(self) -> bytes:
        """Return the next bytes; ``b""`` means the peer closed the transport."""

    async def aclose(self) -> None:
        """Close the transport."""


class StreamCarrier:
    """A carrier over any trio stream (used over in-memory streams in tests)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream

    async def send(self, data: bytes) -> None:
        """Send bytes on the stream."""
        await self._stream.send_all(data)

    can_send_now = False  # a trio stream sends only from a task

    def send_now(self, data: bytes) -> None:
        """Never called: ``can_send_now`` is False."""
        raise NotImplementedError

    async def flush(self) -> None:
        """Nothing is ever left behind."""

    async def receive(self) -> bytes:
        """Receive bytes; a broken stream reads as EOF."""
        try:
            return bytes(await self._stream.receive_some(RECEIVE_CHUNK))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def aclose(self) -> None:
        """Close the stream."""
        await self._stream.aclose()


class _SendAtIoWait(trio.abc.Instrument):
    """Sends what the tasks of one batch of trio's run loop queued, before trio waits for I/O.

    trio calls ``before_io_wait`` on every iteration of its run loop, after the batch of tasks
    it ran, with the wait's timeout already chosen: a task woken here would sleep until that
    timeout, so sessions wake their writer through ``run_sync_soon`` (which interrupts the
    wait) instead. A hook that raises is removed by trio, which would stop every session's
    sending at once, so nothing may escape: a session whose send fails here hands over to its
    writer task, which meets the failure in a task.
    """

    def __init__(self) -> None:
        self.due: dict[TunnelSession, None] = {}  # sessions with frames queued (ordered set)

    def before_io_wait(self, timeout: float) -> None:
        """Send for every session that queued frames in this batch."""
        while self.due:
            session, _ = self.due.popitem()
            try:
                session._send_before_io_wait()
            except Exception as exc:  # noqa: BLE001 (see the class docstring)
                session._send_failure = session._send_failure or exc
                session._call_soon(session._wake_writer)


_SEND_AT_IO_WAIT: trio.lowlevel.RunVar[_SendAtIoWait] = trio.lowlevel.RunVar("petit_send")


def _send_at_io_wait() -> _SendAtIoWait:
    """This trio run's instrument, installed on first use."""
    try:
        return _SEND_AT_IO_WAIT.get()
    except LookupError:
        instrument = _SendAtIoWait()
        trio.lowlevel.add_instrument(instrument)
        _SEND_AT_IO_WAIT.set(instrument)
        return instrument


class SessionClosedError(trio.BrokenResourceError):
    """The tunnel session ended while a stream or an open was in progress."""


class StreamRefusedError(PetitError):
    """The client could not reach its local target (or refused the stream)."""

    def __init__(self, code: ErrorCode) -> None:
        super().__init__(f"stream refused by the client ({code.name})")
        self.code = code


class KeepaliveTimeoutError(PetitError):
    """Nothing arrived from the peer for too long: the tunnel is half-open or dead."""


StreamHandler = Callable[["TunnelStream", str], Awaitable[None]]


class TunnelSession:
    """Runs one ``TunnelConnection`` over one ``Carrier``.

    Do the handshake with ``handshake_as_server`` / ``handshake_as_client``, then
    ``await nursery.start(session.serve)``. The client passes ``stream_handler``, called in
    its own task for every stream the server opens; it must ``accept()`` or ``refuse()``.
    """

    def __init__(
        self,
        connection: TunnelConnection,
        carrier: Carrier,
        *,
        ping_interval: float,
        stream_handler: StreamHandler | None = None,
    ) -> None:
        self.connection = connection
        connection.backlog_of = self._backlog_of
        self._carrier = carrier
        self._ping_interval = ping_interval
        self._stream_handler = stream_handler
        self._streams: dict[int, TunnelStream] = {}
        self._targets: dict[int, str] = {}  # (server) stream id -> the target it was opened to
        self._open_to: dict[str, int] = {}  # (server) target -> streams open to it
        self._pending_events: deque[TunnelEvent] = deque()
        self._send_needed = trio.Event()
        self._at_io_wait: _SendAtIoWait | None = None  # set while serving over a capable carrier
        self._send_failure: BaseException | None = None  # a send at the I/O wait failed
        self._writer_busy = False  # the writer task is in a round: only it sends
        self._trio_token: trio.lowlevel.TrioToken | None = None
        # Woken each time the writer drained the queue (a parking lot: waking nobody is free,
        # where a fresh Event per send would be allocated on every message).
        self._sent = trio.lowlevel.ParkingLot()
        self._streams_changed = trio.Event()
        self._handler_nursery: trio.Nursery | None = None
        self._last_received = trio.current_time()
        self._pong_waiters: dict[bytes, trio.Event] = {}  # ping opaque -> set by its PONG
        self._sending = trio.CancelScope()  # shields the writer's send in progress
        self._send_deadline = math.inf  # set once the session ends
        self.closed = trio.Event()
        self.going_away: GoAwayReceived | None = None
        self.close_reason = ""

    # ---------------------------------------------------------------- handshake phase

    async def wait_drained(self) -> None:
        """Wait until the writer drained the queue once more, or the session ended."""
        if not self.closed.is_set():
            await self._sent.park()

    async def _send_queued_now(self) -> None:
        """Send every queued frame, in carrier messages of whole frames up to the limit (also
        the backlog flushed at close, which many streams' windows could push past the peer's
        message size limit in one piece)."""
        while data := self.connection.data_to_send(MAX_CARRIER_MESSAGE):
            await self._carrier.send(data)

    async def _next_event(self) -> TunnelEvent:
        while not self._pending_events:
            data = await self._carrier.receive()
            try:
                self._pending_events.extend(self.connection.receive_data(data))
            except RemoteProtocolError:
                await self._send_queued_now()
                raise
        return self._pending_events.popleft()

    async def handshake_as_server(
        self, nonce: bytes, check_hello: Callable[[bytes], Awaitable[bytes]]
    ) -> None:
        """Challenge the client and open the session if ``check_hello`` accepts its hello.

        ``check_hello`` returns the WELCOME payload or raises (AuthError for a failed proof);
        on any failure a GOAWAY with the reason is sent before the error propagates.
        """
        self.connection.send_challenge(nonce)
        await self._send_queued_now()
        event = await self._next_event()
        if not isinstance(event, HelloReceived):
            raise RemoteProtocolError(f"expected a hello, got {type(event).__name__}")
        try:
            welcome = await check_hello(event.payload)
        except PetitError as exc:
            self.connection.close(_error_code(exc), str(exc))
            await self._send_queued_now()
            raise
        self.connection.send_welcome(welcome)
        await self._send_queued_now()

    async def handshake_as_client(self, make_hello: Callable[[bytes], bytes]) -> bytes:
        """Answer the server's challenge with ``make_hello(nonce)``; return the WELCOME payload.

        Raises:
            RemoteProtocolError: the server refused (its GOAWAY reason is in the message) or
                broke the protocol.
        """
        event = await self._next_event()
        if not isinstance(event, ChallengeReceived):
            raise RemoteProtocolError(_refusal(event, "a challenge"))
        self.connection.send_hello(make_hello(event.nonce))
        await self._send_queued_now()
        event = await self._next_event()
        if not isinstance(event, Welcomed):
            raise RemoteProtocolError(_refusal(event, "a welcome"))
        return event.payload

    # ---------------------------------------------------------------- running

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until the peer closes (returns) or the tunnel fails (raises).

        Raises:
            RemoteProtocolError: the peer broke the protocol (a GOAWAY was sent).
            KeepaliveTimeoutError: the peer went silent.
        """
        self._last_received = trio.current_time()
        if self._carrier.can_send_now:
            self._trio_token = trio.lowlevel.current_trio_token()
            self._at_io_wait = _send_at_io_wait()
        try:
            async with trio.open_nursery() as nursery:
                self._handler_nursery = nursery
                nursery.start_soon(self._write_loop)
                nursery.start_soon(self._keepalive)
                task_status.started()
                try:
                    await self._read_loop()
                finally:  # every end of the session passes here, cancellation included
                    self._end_sends_by(trio.current_time() + CLOSE_GRACE)
                nursery.cancel_scope.cancel()
        except ExceptionGroup as group:
            # The reader, writer and keepalive stop together: raise the failure that stopped
            # them, not a group, so owners can catch KeepaliveTimeoutError and the rest.
            raise first_leaf(group) from None
        finally:
            self._stop_sending_at_io_wait()
            self._end_all_streams()
            with trio.move_on_after(CLOSE_GRACE, shield=True):
                await self._flush_and_close_carrier()

    async def _read_loop(self) -> None:
        while True:
            while self._pending_events:
                if not self._dispatch(self._pending_events.popleft()):
                    return
            while self.connection.reply_backlog > MAX_REPLY_BACKLOG:
                self.schedule_send()
                await self._sent.park()
            data = await self._carrier.receive()
            self._last_received = trio.current_time()
            try:
                self._pending_events.extend(self.connection.receive_data(data))
            except RemoteProtocolError as exc:
                self.close_reason = f"peer broke the protocol: {exc}"
                raise

    def _dispatch(self, event: TunnelEvent) -> bool:
        """Apply one event without blocking; False once the connection has terminated."""
        match event:
            case DataReceived(stream_id=sid, data=data):
                if (stream := self._streams.get(sid)) is not None:
                    stream._feed(data)
            case WindowUpdated(stream_id=sid):
                if (stream := self._streams.get(sid)) is not None:
                    stream._wake_sender()
            case StreamOpened(stream_id=sid, target=target):
                self._start_handler(sid, target)
            case StreamAccepted(stream_id=sid):
                if (stream := self._streams.get(sid)) is not None:
                    stream._mark_accepted()
            case StreamEnded(stream_id=sid):
                if (stream := self._streams.get(sid)) is not None:
                    stream._feed_eof()
            case StreamReset(stream_id=sid, code=code):
                if (stream := self._streams.get(sid)) is not None:
                    stream._abort(code)
            case PingReceived():
                self.schedule_send()
            case PongReceived(opaque=opaque):
                if (waiter := self._pong_waiters.pop(opaque, None)) is not None:
                    waiter.set()
            case GoAwayReceived():
                self.going_away = event
                self.close_reason = f"peer is going away ({event.code.name}) {event.reason}"
            case ConnectionTerminated():
                self.close_reason = self.close_reason or "peer closed the tunnel"
                return False
            case ChallengeReceived() | HelloReceived() | Welcomed():
                raise AssertionError("the connection refuses handshake frames once open")
        return True

    def _start_handler(self, stream_id: int, target: str) -> None:
        stream = TunnelStream(self, stream_id)
        self._streams[stream_id] = stream
        if self._stream_handler is None or self._handler_nursery is None:
            stream.refuse(ErrorCode.REFUSED)
            return
        self._handler_nursery.start_soon(self._run_handler, stream, target)

    async def _run_handler(self, stream: TunnelStream, target: str) -> None:
        assert self._stream_handler is not None
        try:
            await self._stream_handler(stream, target)
        except Exception:  # per-stream boundary: one bad stream never ends the session
            log.exception("stream %d handler failed", stream.stream_id)
        finally:
            if trio.current_effective_deadline() == -math.inf:
                # Cancelled: only the session's end does that. A RESET now would tell the
                # server its open was refused (502); the session's end says the client left.
                stream._abort(None)
            await stream.aclose()

    async def _write_loop(self) -> None:
        while True:
            await self._send_needed.wait()
            self._send_needed = trio.Event()
            if self._send_failure is not None:
                raise trio.BrokenResourceError(
                    f"the tunnel failed: {self._send_failure}"
                ) from self._send_failure
            # A send cancelled half-way breaks the carrier (a TLS stream cannot resume) and
            # the GOAWAY flushed after it is lost: when the session ends, the send in
            # progress is not cancelled but bounded by _end_sends_by.
            self._writer_busy = True
            try:
                with trio.CancelScope(shield=True, deadline=self._send_deadline) as self._sending:
                    await self._carrier.flush()
                    await self._send_queued_now()
            finally:
                self._writer_busy = False
            self._sent.unpark_all()

    def _send_before_io_wait(self) -> None:
        """(``_SendAtIoWait``) Send the queue if the carrier takes it without waiting, else
        leave it to the writer task. Never raises: trio removes an instrument that does."""
        carrier = self._carrier
        if not self._writer_busy:  # (a writer in its round may hold frames already)
            try:
                while carrier.can_send_now and (
                    data := self.connection.data_to_send(MAX_CARRIER_MESSAGE)
                ):
                    carrier.send_now(data)
            except Exception as exc:  # noqa: BLE001 (a bug too: trio would drop the instrument)
                self._send_failure = exc  # the writer raises it in a task, ending the session
        # A failure, frames left, or bytes left for the socket: the writer takes over.
        if (
            self._send_failure is not None
            or self.connection.has_data_to_send
            or not carrier.can_send_now
        ):
            self._call_soon(self._wake_writer)
        elif self._sent.statistics().tasks_waiting:
            self._call_soon(self._sent.unpark_all)

    def _call_soon(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` in the next batch; it may wake tasks (see ``_SendAtIoWait``)."""
        assert self._trio_token is not None
        self._trio_token.run_sync_soon(callback, idempotent=True)

    def _wake_writer(self) -> None:
        self._send_needed.set()

    def _stop_sending_at_io_wait(self) -> None:
        """From now on only tasks send (the flush at the session's end)."""
        if self._at_io_wait is not None:
            self._at_io_wait.due.pop(self, None)
            self._at_io_wait = None

    def _end_sends_by(self, deadline: float) -> None:
        """Cancel the send in progress, and any later one, at ``deadline`` at the latest."""
        self._send_deadline = min(self._send_deadline, deadline)
        self._sending.deadline = self._send_deadline

    async def _keepalive(self) -> None:
        tick = self._ping_interval / 4
        last_ping = trio.current_time()
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            if now - self._last_received > 1.5 * self._ping_interval:
                self.close_reason = f"no traffic for {now - self._last_received:.1f}s"
                self.connection.close(ErrorCode.TIMEOUT, "keepalive timeout")
                self._end_sends_by(now)  # a silent peer reads nothing and answers no close
                raise KeepaliveTimeoutError(self.close_reason)
            if now - last_ping >= self._ping_interval:
                last_ping = now
                self.connection.ping(secrets.token_bytes(8))
                self.schedule_send()

    def _end_all_streams(self) -> None:
        for stream in list(self._streams.values()):
            stream._abort(None)
        self._streams.clear()
        self._targets.clear()
        self._open_to.clear()
        for waiter in self._pong_waiters.values():
            waiter.set()  # left in the dict: ping_round_trip sees it was never answered
        self.closed.set()
        self._sent.unpark_all()  # senders waiting for the queue to drain: it never will
        self._streams_changed.set()

    async def _flush_and_close_carrier(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self._carrier.flush()
            await self._send_queued_now()
        with trio.CancelScope(deadline=self._send_deadline):  # a silent peer: do not wait
            await self._carrier.aclose()  # (a WebSocket waits for the peer's close frame)

    # ---------------------------------------------------------------- for streams and owners

    def schedule_send(self) -> None:
        """Frames are queued on the connection: have them sent once this batch of tasks ran."""
        if self._at_io_wait is not None:
            self._at_io_wait.due[self] = None
        else:
            self._send_needed.set()

    def _backlog_of(self, stream_id: int) -> int:
        """Bytes of a stream's consumed DATA still in the send queue of the socket it ends in."""
        stream = self._streams.get(stream_id)
        drain = None if stream is None else stream.drain
        return 0 if drain is None else sockio.unsent_bytes(drain)

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
        if (target := self._targets.pop(stream_id, None)) is not None:
            if left := self._open_to[target] - 1:
                self._open_to[target] = left
            else:
                del self._open_to[target]
        self._streams_changed.set()
        self._streams_changed = trio.Event()

    async def wait_idle(self) -> None:
        """Return once no stream is in flight (or the session ended)."""
        while self._streams and not self.closed.is_set():
            await self._streams_changed.wait()

    @property
    def active_streams(self) -> int:
        """How many streams are live on this session."""
        return len(self._streams)

    def streams_to(self, target: str) -> int:
        """(server) How many streams opened to ``target`` are live on this session."""
        return self._open_to.get(target, 0)

    async def open_stream(self, target: str) -> TunnelStream:
        """(server) Open a stream towards registration ``target``; wait for the client's answer.

        Raises:
            StreamRefusedError: the client could not reach its local target.
            SessionClosedError: the session ended or is draining.
        """
        if self.closed.is_set() or self.going_away is not None:
            raise SessionClosedError("the tunnel session is closed")
        try:
            stream_id = self.connection.open_stream(target)
        except LocalProtocolError as exc:
            raise SessionClosedError(str(exc)) from None
        stream = TunnelStream(self, stream_id)
        self._streams[stream_id] = stream
        self._targets[stream_id] = target
        self._open_to[target] = self._open_to.get(target, 0) + 1
        self.schedule_send()
        try:
            await stream._wait_accepted()
        except BaseException:
            stream._close_locally()
            raise
        return stream

    async def ping_round_trip(self) -> float:
        """Ping the peer; return the seconds until its PONG. The caller bounds the wait.

        Raises:
            SessionClosedError: the session ended before the answer came.
        """
        if self.closed.is_set():
            raise SessionClosedError(self.close_reason or "the tunnel session is closed")
        opaque = secrets.token_bytes(8)
        answered = trio.Event()
        self._pong_waiters[opaque] = answered
        began = trio.current_time()
        try:
            try:
                self.connection.ping(opaque)
            except LocalProtocolError as exc:
                raise SessionClosedError(str(exc)) from None
            self.schedule_send()
            await answered.wait()
        finally:
            unanswered = self._pong_waiters.pop(opaque, None) is not None
        if unanswered:
            raise SessionClosedError(self.close_reason or "the tunnel closed before the pong")
        return trio.current_time() - began

    def close(self, reason: str) -> None:
        """End a serving session now: the peer gets a GOAWAY, streams break, ``serve`` returns.

        Unlike cancelling ``serve`` from outside, the carrier stays usable long enough to
        tell the peer and close cleanly.
        """
        self.close_reason = reason
        self.connection.close(ErrorCode.NO_ERROR, reason)
        if self._handler_nursery is not None:
            self._handler_nursery.cancel_scope.cancel()

    def go_away(self, reason: str) -> None:
        """Tell the peer we are draining: nothing new opens; in-flight streams go on."""
        self.going_away = GoAwayReceived(ErrorCode.SHUTDOWN, reason)
        self.connection.go_away(ErrorCode.SHUTDOWN, reason)
        self.schedule_send()


class _ConflictDetector:
    """Raise trio.BusyResourceError when two tasks use one direction of a stream at once."""

    def __init__(self, operation: str) -> None:
        self._operation = operation
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(f"another task is already {self._operation}")
        self._held = True

    def __exit__(self, *exc_info: object) -> None:
        self._held = False

    @property
    def held(self) -> bool:
        """Whether a task is inside the operation right now."""
        return self._held


class TunnelStream(trio.abc.HalfCloseableStream):
    """One stream of a tunnel session, as a trio stream.

    Errors follow trio's contract: BrokenResourceError when the stream was reset or the
    session died, ClosedResourceError after our own ``aclose()``.
    """

    def __init__(self, session: TunnelSession, stream_id: int) -> None:
        self._session = session
        self.stream_id = stream_id
        self._buffer: deque[bytes] = deque()  # bounded by the receive window we granted
        self._eof = False
        self._accepted = False
        self._reset_code: ErrorCode | None = None
        self._broken = False
        self._closed = False
        self._sent_eof = False
        self._changed = trio.Event()  # data, eof, window, accept or abort
        # While a relay waits for data with nothing in hand, DATA goes straight into its
        # socket from the session's reader (see ``relay_some``); -1 when not.
        self._relay_fd = -1
        self._relay_counted: Callable[[int], None] = _ignore
        self.drain: trio.socket.SocketType | None = None  # the socket our bytes end in, if known
        self._send_conflict = _ConflictDetector("sending on this stream")
        self._receive_conflict = _ConflictDetector("receiving on this stream")

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_for_change(self) -> None:
        await self._changed.wait()

    # Called by the session's reader, never blocking.
    def _feed(self, data: bytes) -> None:
        if self._relay_fd >= 0 and not self._buffer:
            try:
                written = os.write(self._relay_fd, data)
            except OSError:  # full (BlockingIOError) or broken: the relay's own send finds out
                written = 0
            if written:
                self._consumed(written)
                self._relay_counted(written)
                if written == len(data):
                    return
                data = data[written:]
        self._buffer.append(data)
        self._notify()

    def _consumed(self, size: int) -> None:
        """``size`` received bytes left us: credit goes back to the peer (in batches)."""
        connection = self._session.connection
        connection.acknowledge_received_data(self.stream_id, size)
        if connection.has_data_to_send:
            self._session.schedule_send()

    def _feed_eof(self) -> None:
        self._eof = True
        self._notify()

    def _wake_sender(self) -> None:
        self._notify()

    def _mark_accepted(self) -> None:
        self._accepted = True
        self._notify()

    def _abort(self, code: ErrorCode | None) -> None:
        self._broken = True
        self._reset_code = code
        self._notify()

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        if self._broken:
            if self._reset_code is None:
                raise SessionClosedError(self._session.close_reason or "the tunnel closed")
            raise trio.BrokenResourceError(f"stream reset by peer ({self._reset_code.name})")

    async def _wait_accepted(self) -> None:
        while not self._accepted:
            if self._broken and self._reset_code is not None:
                raise StreamRefusedError(self._reset_code)
            self._check_usable()
            await self._wait_for_change()

    # Client side: answer an OPEN.
    def accept(self) -> None:
        """Tell the server the local target is reached; data may flow.

        Raises:
            trio.BrokenResourceError: the server gave up on the stream meanwhile.
        """
        self._check_usable()
        self._session.connection.accept_stream(self.stream_id)
        self._accepted = True
        self._session.schedule_send()

    def refuse(self, code: ErrorCode = ErrorCode.REFUSED) -> None:
        """Tell the server the local target cannot be reached."""
        self._session.connection.reset_stream(self.stream_id, code)
        self._session.schedule_send()
        self._closed = True
        self._session._forget(self.stream_id)

    def drains_into(self, sock: trio.socket.SocketType) -> None:
        """Name the socket this stream's bytes are written into: a reader slower than the
        tunnel then shows as that socket's send queue growing, and does not grow its window
        (see petit.connection)."""
        self.drain = sock

    # trio.abc.HalfCloseableStream
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``, waiting for flow-control credit as needed."""
        with self._send_conflict:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._sent_eof and not self._closed:
                raise trio.ClosedResourceError("send_eof() was already called")
            self._check_usable()  # even for b"": a closed stream refuses every send
            view = memoryview(data)
            while view:
                if self._session.connection.queued_bytes >= MAX_SEND_QUEUE:
                    await self._session.wait_drained()
                    self._check_usable()
                elif sent := self._queue_data(view):
                    view = view[sent:]
                else:
                    await self._wait_for_change()
            await trio.lowlevel.cancel_shielded_checkpoint()

    def send_nowait(self, data: bytes) -> int:
        """Queue as much of ``data`` as the send window takes now, without yielding; the
        bytes queued (send the rest with ``send_all``). Not a checkpoint: for a relay whose
        next read is one."""
        with self._send_conflict:
            if self._sent_eof and not self._closed:
                raise trio.ClosedResourceError("send_eof() was already called")
            return self._queue_data(memoryview(data))

    def _queue_data(self, view: memoryview) -> int:
        """Queue what the send window and the session's queue bound take of ``view`` now."""
        self._check_usable()
        room = MAX_SEND_QUEUE - self._session.connection.queued_bytes
        if room <= 0:
            return 0
        try:
            sent = self._session.connection.send_data(self.stream_id, view[:room])
        except LocalProtocolError as exc:
            raise trio.BrokenResourceError(str(exc)) from None
        if sent:
            self._session.schedule_send()
        return sent

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until there is send credit."""
        with self._send_conflict:
            while True:
                self._check_usable()
                if self._session.connection.send_window(self.stream_id) > 0:
                    await trio.lowlevel.checkpoint()
                    return
                await self._wait_for_change()

    async def send_eof(self) -> None:
        """Half-close: the peer reads EOF after the data already sent."""
        with self._send_conflict:
            await trio.lowlevel.checkpoint()
            self._check_usable()
            if self._sent_eof:
                return
            self._sent_eof = True
            try:
                self._session.connection.end_stream(self.stream_id)
            except LocalProtocolError as exc:
                raise trio.BrokenResourceError(str(exc)) from None
            self._session.schedule_send()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return up to ``max_bytes`` bytes; ``b""`` after the peer's END."""
        limit = RECEIVE_CHUNK if max_bytes is None else operator.index(max_bytes)
        if limit < 1:
            raise ValueError("max_bytes must be at least 1")
        return await self._receive(limit)

    async def relay_some(self, sink: trio.SocketStream, counted: Callable[[int], None]) -> bytes:
        """``receive_some`` for a relay into ``sink``: while it waits with nothing buffered,
        DATA is written into ``sink``'s socket by the session's reader, without waking this
        task (``counted(n)`` for each write); what the socket cannot take at once is
        buffered and returned as usual. The caller is ``sink``'s only writer; order holds
        because the reader bypasses only an empty buffer while this task waits."""
        return await self._receive(RECEIVE_CHUNK, sink.socket.fileno(), counted)

    async def _receive(
        self, limit: int, relay_fd: int = -1, counted: Callable[[int], None] = _ignore
    ) -> bytes:
        with self._receive_conflict:
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False  # then that wait was this call's checkpoint: no second one
            while not self._buffer:
                if self._closed:
                    raise trio.ClosedResourceError("this stream was closed")
                if self._eof:
                    if not waited:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    return b""
                self._check_usable()
                self._relay_fd, self._relay_counted = relay_fd, counted
                try:
                    await self._wait_for_change()
                finally:
                    self._relay_fd, self._relay_counted = -1, _ignore
                waited = True
            chunk = self._buffer.popleft()
            if len(chunk) > limit:
                self._buffer.appendleft(chunk[limit:])
                chunk = chunk[:limit]
            self._consumed(len(chunk))
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return chunk

    def _close_locally(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._buffer.clear()  # nobody may read it any more
        if not self._broken:
            self._session.connection.reset_stream(self.stream_id, ErrorCode.CANCEL)
            self._session.schedule_send()
        self._session._forget(self.stream_id)
        self._notify()

    async def aclose(self) -> None:
        """Close the stream gracefully, as closing a socket does.

        The peer reads what we sent, then EOF (an END, unless a send was interrupted); a
        RESET(CANCEL) follows unless both sides already ended the stream, so the peer's
        sends fail instead of waiting for credit we will never grant.
        """
        graceful = self._accepted and not self._send_conflict.held
        if graceful and not (self._closed or self._broken or self._sent_eof):
            self._sent_eof = True
            with contextlib.suppress(LocalProtocolError):  # the connection already closed
                self._session.connection.end_stream(self.stream_id)
                self._session.schedule_send()
        if self._sent_eof and self._eof and not self._buffer:
            self._broken = True  # fully closed cleanly: nothing to reset
        self._close_locally()
        await trio.lowlevel.checkpoint()


@dataclass(slots=True)
class Traffic:
    """Bytes ``splice`` copied each way; one instance may add up many streams."""

    a_to_b: int = 0
    b_to_a: int = 0


async def splice(a: trio.abc.Stream, b: trio.abc.Stream, traffic: Traffic | None = None) -> None:
    """Copy bytes both ways until both directions reached EOF, passing half-closes on.

    A side that cannot half-close (a TLS stream) just stops receiving in that direction
    after EOF; the other direction goes on. If either side breaks, both directions stop
    (the caller closes both streams). ``traffic`` is updated as bytes go. From a tunnel
    stream into a socket, the session's reader writes straight into the socket whenever it
    can (``TunnelStream.relay_some``): one task wake-up and two checkpoints fewer per
    message. From a socket into a tunnel stream, ``_relay_socket`` reads the socket itself
    and queues without yielding: one yield per chunk instead of three.
    """
    counts = traffic or Traffic()

    def count_a_to_b(size: int) -> None:
        counts.a_to_b += size

    def count_b_to_a(size: int) -> None:
        counts.b_to_a += size

    async def pump(
        source: trio.abc.Stream,
        sink: trio.abc.Stream,
        counted: Callable[[int], None],
        scope: trio.CancelScope,
    ) -> None:
        chunk: bytes | bytearray
        try:
            if isinstance(source, trio.SocketStream) and isinstance(sink, TunnelStream):
                await _relay_socket(source, sink, counted)
            else:
                if isinstance(source, Drained) and isinstance(sink, trio.SocketStream):
                    source.drains_into(sink.socket)
                while True:
                    if isinstance(source, TunnelStream) and isinstance(sink, trio.SocketStream):
                        chunk = await source.relay_some(sink, counted)
                    else:
                        chunk = await source.receive_some(RECEIVE_CHUNK)
                    if not chunk:
                        break
                    await sink.send_all(chunk)
                    counted(len(chunk))
            if isinstance(sink, trio.abc.HalfCloseableStream):
                await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, a, b, count_a_to_b, nursery.cancel_scope)
        nursery.start_soon(pump, b, a, count_b_to_a, nursery.cancel_scope)


async def _relay_socket(
    source: trio.SocketStream, sink: TunnelStream, counted: Callable[[int], None]
) -> None:
    """Copy a socket into a tunnel stream until the socket's EOF, one yield per chunk.

    ``receive_some`` + ``send_all`` yield three times per chunk (after the read, after the
    queueing, and in the wait of a read that fails with EAGAIN). Here a read that came back
    short emptied the socket, so the next one waits for readability first; after a full
    read it only checkpoints; queueing into the stream yields only when its window is
    exhausted.
    """
    sock = source.socket
    drained = True
    while True:
        if drained:
            await trio.lowlevel.wait_readable(sock)
        else:
            await trio.lowlevel.checkpoint()
        try:
            chunk = os.read(sock.fileno(), RECEIVE_CHUNK)
        except BlockingIOError:
            drained = True
            continue
        if not chunk:
            return
        drained = len(chunk) < RECEIVE_CHUNK
        sent = sink.send_nowait(chunk)
        if sent < len(chunk):
            await sink.send_all(memoryview(chunk)[sent:])
        counted(len(chunk))


def _error_code(exc: PetitError) -> ErrorCode:
    if isinstance(exc, AuthError):
        return ErrorCode.AUTH
    if isinstance(exc, ProtocolError):
        return exc.code
    return ErrorCode.INTERNAL


def _refusal(event: TunnelEvent, expected: str) -> str:
    if isinstance(event, GoAwayReceived):
        return f"the server refused the tunnel ({event.code.name}): {event.reason}"
    if isinstance(event, ConnectionTerminated):
        return "the server closed the connection during the handshake"
    return f"expected {expected}, got {type(event).__name__}"
