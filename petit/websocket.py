"""WebSocket over a trio stream: wsproto's engine, driven by the task that reads or writes.

The tunnel's carrier is standard WebSocket (RFC 6455) so HTTP proxies and ingress controllers
pass it, but it is a byte stream to the session above it: frames may cross message
boundaries. So nothing here reassembles messages for the session, and no task of its own
reads ahead; trio-websocket did both (a reader task per connection handing each whole message
over a memory channel), which cost a task switch and a copy per message.

# Theory of operation

- One ``WebSocket`` wraps one stream (TLS, in production) and one ``wsproto.WSConnection``.
  trio's rule for streams holds: at most one task receives at a time. The session's reader
  calls ``receive``; its writer calls ``send``, the reader sends its answers to control
  frames, and between batches of tasks the session may ``send_now`` (no task: see
  ``petit.session``), which it does only when ``can_send_now`` says no task is writing or
  waiting to write. The short registration exchanges call ``get_message``/``send_message``
  from one task.
- ``receive`` reads up to ``RECEIVE_BUFFER`` bytes, feeds wsproto, and returns the binary
  payload bytes that came out: any part of a message, joined when a read held several.
  ``get_message`` collects whole messages instead, bounded by a size limit.
- Control frames are answered by the receiving task itself: a PING's PONG and the reply to
  the peer's close frame are sent before it reads on. A peer that floods PINGs and never reads
  therefore stalls its own reader here: we stop reading it, we never queue for it. Task sends
  are serialised by a flag and a parking lot (an uncontended send does not yield for a lock);
  a task parked there already holds its framed message, so nothing may be sent before it.
- Closing: ``aclose`` sends a close frame, waits (bounded by the caller's cancel scope, and
  by ``CLOSE_WAIT`` at most) for the peer's, then closes the stream. When the peer closes
  first, ``receive`` answers it and returns ``b""``. A frame that breaks RFC 6455 is answered
  with a close frame carrying its code and raises ``RemoteProtocolError``.
- Server side, ``serve_websocket`` accepts TCP, runs TLS and reads the upgrade request under
  one ``handshake_timeout``, then hands an ``UpgradeRequest`` to the handler, which accepts it
  (a ``WebSocket``) or rejects it with a status. Anything that is not a WebSocket upgrade gets
  wsproto's 400 (or 426) and the connection is closed.
- Masking: RFC 6455 has the client XOR every payload byte with a 4-byte key, which wsproto
  does in Python (about 1.1 ms per MB each way; a third of a bulk transfer's CPU on each
  side). ``_CMasker`` does the same XOR with websockets' C ``apply_mask`` (23 us per MB) and is
  put in the place of wsproto's masker class at import. It reaches wsproto's module global
  ``XorMaskerSimple``: if wsproto renames it, or websockets comes without its C extension,
  nothing is replaced (slower, same bytes) and tests/io/test_websocket.py says so. The
  extension is loaded from its file alone: importing ``websockets.speedups`` would run the
  package's ``__init__``, which imports importlib.metadata, email and zipfile (1.8 MB of
  every process's RSS) for one function.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader
from pathlib import Path

import trio
from wsproto import ConnectionType, WSConnection, frame_protocol
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError as HandshakeProtocolError

from petit.errors import PetitError, RemoteProtocolError
from petit.listen import serve_tcp
from petit.tls import server_handshake
from petit.tlsio import TlsSocket

log = logging.getLogger("petit.websocket")

# Bytes per read from the stream: a bulk transfer's messages are 256 KiB of frames.
RECEIVE_BUFFER = 256 * 1024
MAX_CONTROL_MESSAGE = 64 * 1024  # bytes; get_message's limit (registration messages are tiny)
CLOSE_WAIT = 1.0  # seconds aclose waits for the peer's close frame at most
NORMAL_CLOSURE = 1000
UNSUPPORTED_DATA = 1003
MESSAGE_TOO_BIG = 1009


def _c_apply_mask() -> Callable[[bytes | bytearray, bytes], bytes] | None:
    """websockets' C ``apply_mask``, from its extension module alone; None without it."""
    package = importlib.util.find_spec("websockets")  # found, not imported
    for directory in (package and package.submodule_search_locations) or ():
        for suffix in EXTENSION_SUFFIXES:
            path = Path(directory, "speedups" + suffix)
            if not path.is_file():
                continue
            loader = ExtensionFileLoader("websockets.speedups", str(path))
            spec = importlib.util.spec_from_loader(loader.name, loader)
            if spec is None:
                return None
            try:
                module = importlib.util.module_from_spec(spec)
                loader.exec_module(module)
            except ImportError:
                return None
            apply_mask: Callable[[bytes | bytearray, bytes], bytes] = module.apply_mask
            return apply_mask
    return None


apply_mask = _c_apply_mask()


class _CMasker:
    """wsproto's ``XorMaskerSimple`` (the same interface and bytes), with the XOR done in C."""

    def __init__(self, masking_key: bytes | bytearray) -> None:
        self._masking_key = bytes(masking_key)

    def process(self, data: bytes | bytearray) -> bytes:
        """XOR ``data`` with the key, continuing where the previous call stopped."""
        if not data:
            return b""
        assert apply_mask is not None  # only installed with it
        masked = apply_mask(data, self._masking_key)
        if turn := len(data) % 4:  # the next call continues with the next key byte
            self._masking_key = self._masking_key[turn:] + self._masking_key[:turn]
        return masked


if apply_mask is not None and hasattr(frame_protocol, "XorMaskerSimple"):
    frame_protocol.XorMaskerSimple = _CMasker  # type: ignore[misc,assignment]


class WebSocketClosedError(trio.BrokenResourceError):
    """The WebSocket closed (either side) before the message could be sent or received."""


class HandshakeError(PetitError):
    """The peer did not complete the WebSocket upgrade (refused it, or spoke no HTTP)."""


class WebSocket:
    """A WebSocket connection carrying binary messages; also the tunnel's ``Carrier``."""

    def __init__(self, stream: trio.abc.Stream, connection: WSConnection) -> None:
        self._stream = stream
        # TLS driven straight over the socket when ``stream`` allows it (petit.tlsio)
        self._tls = TlsSocket.take_over(stream)
        self._connection = connection
        # (payload, ends its message, came in a text message)
        self._received: deque[tuple[bytes | bytearray, bool, bool]] = deque()
        self._ended = ""  # why no more data will come; "" while open
        self._eof = False  # the stream ended
        self._writing = False
        self._written = trio.lowlevel.ParkingLot()
        self._receiving = False

    # ------------------------------------------------------------------ sending

    async def send(self, data: bytes) -> None:
        """Send one binary message."""
        await self.send_message(data)

    async def send_message(self, data: bytes | str) -> None:
        """Send one message: binary for bytes, text for a str (the registration exchanges'
        JSON, text since the first release)."""
        if self._connection.state is not ConnectionState.OPEN:
            raise WebSocketClosedError(f"the WebSocket is closed ({self._ended or 'by us'})")
        message = TextMessage(data=data) if isinstance(data, str) else BytesMessage(data=data)
        await self._write(self._connection.send(message))

    @property
    def can_send_now(self) -> bool:
        """Whether ``send_now`` may be called: TLS driven by us, no task writing, and no
        ciphertext waiting for the socket (so bytes cannot overtake each other)."""
        tls = self._tls
        return (
            tls is not None
            and not self._writing
            and not self._written  # a task parked there holds a framed message already
            and not tls.backlog
            and self._connection.state is ConnectionState.OPEN
        )

    def send_now(self, data: bytes) -> None:
        """Send one binary message without yielding (only when ``can_send_now``); what the
        kernel does not take waits for ``flush``. Raises as ``send`` does."""
        assert self._tls is not None, "can_send_now was False"
        self._tls.send_nowait(self._connection.send(BytesMessage(data=data)))

    async def flush(self) -> None:
        """Wait until what ``send_now`` left for the socket is written."""
        if self._tls is not None and self._tls.backlog:
            await self._write(b"")

    async def _write(self, data: bytes) -> None:
        sink = self._stream if self._tls is None else self._tls
        while self._writing:
            await self._written.park()
        self._writing = True
        try:
            if data:
                await sink.send_all(data)
            else:
                assert self._tls is not None
                await self._tls.flush()
        finally:
            self._writing = False
            self._written.unpark()

    # ------------------------------------------------------------------ receiving

    async def receive(self) -> bytes:
        """The next binary payload bytes, any part of a message; ``b""`` once closed."""
        while not self._received:
            if self._ended:
                return b""
            await self._pump()
        if any(text for _, _, text in self._received):
            await self._close_quietly(UNSUPPORTED_DATA, "the tunnel takes binary messages")
            raise RemoteProtocolError("a text WebSocket message on the tunnel")
        if len(self._received) == 1:
            return bytes(self._received.popleft()[0])
        chunks = [data for data, _, _ in self._received]
        self._received.clear()
        return b"".join(chunks)

    async def get_message(self, limit: int = MAX_CONTROL_MESSAGE) -> bytes:
        """The next whole message (a text one UTF-8 encoded), at most ``limit`` bytes.

        Raises:
            WebSocketClosedError: the WebSocket closed first.
            RemoteProtocolError: a message over ``limit`` (the WebSocket is closed with 1009).
        """
        parts: list[bytes | bytearray] = []
        size = 0
        while True:
            while not self._received:
                if self._ended:
                    raise WebSocketClosedError(f"the WebSocket closed: {self._ended}")
                await self._pump()
            data, finished, _ = self._received.popleft()
            parts.append(data)
            size += len(data)
            if size > limit:
                await self._close_quietly(MESSAGE_TOO_BIG, "message too big")
                raise RemoteProtocolError(f"a WebSocket message over {limit} bytes")
            if finished:
                return b"".join(parts)

    async def _pump(self) -> None:
        """Read once from the stream and apply what wsproto makes of it."""
        self._receiving = True
        try:
            source = self._stream if self._tls is None else self._tls
            data = await source.receive_some(RECEIVE_BUFFER)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        finally:
            self._receiving = False
        if not data:
            self._eof = True
            self._ended = self._ended or "the connection ended without a WebSocket close"
            return
        self._connection.receive_data(bytes(data))
        await self._apply(self._connection.events())

    async def _apply(self, events: Iterable[Event]) -> None:
        for event in events:
            match event:
                case BytesMessage(data=data, message_finished=finished):
                    if data or finished:
                        self._received.append((data, finished, False))
                case TextMessage(data=text, message_finished=finished):
                    if text or finished:
                        self._received.append((text.encode(), finished, True))
                case Ping() if self._connection.state is ConnectionState.OPEN:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self._write(self._connection.send(event.response()))
                case CloseConnection(code=code, reason=reason):
                    await self._closed_by_peer(event, code, reason)

    async def _closed_by_peer(self, event: CloseConnection, code: int, reason: str | None) -> None:
        state = self._connection.state
        if state is ConnectionState.REMOTE_CLOSING:  # the peer closes: answer it
            self._ended = f"closed by the peer ({code}{f' {reason}' if reason else ''})"
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._write(self._connection.send(event.response()))
        elif state is ConnectionState.CLOSED:  # the answer to our close
            self._ended = self._ended or "closed"
        else:  # wsproto could not parse the peer's frames
            self._ended = f"protocol error: {reason}"
            await self._close_quietly(code, reason or "")
            raise RemoteProtocolError(f"the peer broke the WebSocket protocol: {reason}")

    # ------------------------------------------------------------------ closing

    async def _close_quietly(self, code: int, reason: str) -> None:
        """Send a close frame if we still may; a dead stream is not an error here."""
        if self._connection.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            self._ended = self._ended or f"closed by us ({code} {reason})"
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._write(self._connection.send(CloseConnection(code, reason)))

    async def aclose(self) -> None:
        """Close: our close frame, the peer's (bounded), then the stream."""
        try:
            await self._close_quietly(NORMAL_CLOSURE, "")
            if not self._receiving:  # a reader elsewhere would get the peer's answer
                with trio.move_on_after(CLOSE_WAIT):
                    while self._connection.state is ConnectionState.LOCAL_CLOSING and not self._eof:
                        self._received.clear()
                        await self._pump()
        except RemoteProtocolError:
            pass  # closing anyway
        finally:
            await self._stream.aclose()


# ---------------------------------------------------------------------- handshakes


async def connect(stream: trio.abc.Stream, host: str, path: str) -> WebSocket:
    """Upgrade ``stream`` to a WebSocket as a client (``host`` is the Host header).

    Raises:
        HandshakeError: the server refused the upgrade or spoke no HTTP.
        trio.BrokenResourceError: the stream broke.
    """
    connection = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(connection.send(Request(host=host, target=path)))
    websocket = WebSocket(stream, connection)
    while True:
        data = await stream.receive_some(RECEIVE_BUFFER)
        if not data:
            raise HandshakeError("the server closed the connection during the upgrade")
        try:
            connection.receive_data(bytes(data))
            events = list(connection.events())
        except HandshakeProtocolError as exc:
            raise HandshakeError(f"not a WebSocket answer: {exc}") from None
        for index, event in enumerate(events):
            if isinstance(event, AcceptConnection):
                await websocket._apply(events[index + 1 :])
                return websocket
            if isinstance(event, RejectConnection):
                raise HandshakeError(f"the server answered {event.status_code}")


@dataclass(slots=True)
class UpgradeRequest:
    """A client's WebSocket upgrade, read and not yet answered."""

    path: str
    remote: str  # the peer's address, for logs and rate limits
    _stream: trio.abc.Stream
    _connection: WSConnection
    websocket: WebSocket | None = None

    async def accept(self) -> WebSocket:
        """Accept the upgrade; the WebSocket is closed by ``serve_websocket`` afterwards."""
        await self._stream.send_all(self._connection.send(AcceptConnection()))
        self.websocket = WebSocket(self._stream, self._connection)
        return self.websocket

    async def reject(self, status: int) -> None:
        """Refuse the upgrade with an HTTP ``status`` and no body."""
        await _reject(self._stream, self._connection, RejectConnection(status_code=status))


async def _reject(stream: trio.abc.Stream, connection: WSConnection, event: Event) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        data = connection.send(event)
        if isinstance(event, RejectConnection) and event.has_body:
            data += connection.send(RejectData(data=b"", body_finished=True))
        await stream.send_all(data)


async def read_upgrade(stream: trio.abc.Stream, remote: str) -> UpgradeRequest | None:
    """Read a client's upgrade request; None once it was answered with an error (not one)."""
    connection = WSConnection(ConnectionType.SERVER)
    while True:
        data = await stream.receive_some(RECEIVE_BUFFER)
        if not data:
            return None
        try:
            connection.receive_data(bytes(data))
            events = list(connection.events())
        except HandshakeProtocolError as exc:
            log.debug("not a WebSocket upgrade from %s: %s", remote, exc)
            hint = exc.event_hint or RejectConnection(status_code=400)
            await _reject(stream, connection, hint)
            return None
        for event in events:
            if isinstance(event, Request):
                return UpgradeRequest(event.target, remote, stream, connection)


UpgradeHandler = Callable[[UpgradeRequest], Awaitable[object]]


async def serve_websocket(
    handler: UpgradeHandler,
    ssl_context: ssl.SSLContext,
    *,
    host: str,
    port: int,
    handler_nursery: trio.Nursery,
    handshake_timeout: float,
    shared: bool = False,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen for WebSocket-over-TLS connections; report the bound port (``shared``: with
    the other workers' sockets, ``petit.listen``).

    TLS and the upgrade request must complete within ``handshake_timeout`` of the TCP accept.
    The WebSocket is closed once ``handler`` returns.
    """

    async def serve_one(connection: trio.SocketStream) -> None:
        remote = _address(connection)
        tls = trio.SSLStream(connection, ssl_context, server_side=True, https_compatible=True)
        request = None
        with trio.move_on_after(handshake_timeout):
            try:
                await server_handshake(tls)
                request = await read_upgrade(tls, remote)
            except (trio.BrokenResourceError, ssl.SSLError) as exc:
                log.debug("no WebSocket from %s: %s", remote, exc.__cause__ or exc)
        if request is None:
            await trio.aclose_forcefully(tls)
            return
        try:
            await handler(request)
        except Exception:  # per-connection boundary: one bad peer never stops the listener
            log.exception("the WebSocket handler for %s failed", remote)
        finally:
            if request.websocket is not None:
                with trio.move_on_after(CLOSE_WAIT):
                    await request.websocket.aclose()
            await trio.aclose_forcefully(tls)

    await serve_tcp(
        serve_one,
        port,
        host=host,
        what="tunnel endpoint",
        handler_nursery=handler_nursery,
        shared=shared,
        task_status=task_status,
    )


def _address(connection: trio.SocketStream) -> str:
    try:
        return str(connection.socket.getpeername()[0])
    except OSError:
        return "?"
