"""TLS over a socket without trio's per-call machinery: the tunnel carrier's fast path.

trio's SSLStream costs, on every ``receive_some``, a read of the socket that fails (EAGAIN),
a wait, the read again, then one more trip through the scheduler; each ``send_all`` takes
locks and checkpoints too. The tunnel makes a few such calls per message each way, so on a
small round trip (a redis GET) they were most of the time petit spent.

# Theory of operation

- A ``TlsSocket`` takes over an ``SSLStream`` whose handshake is done (``take_over``): it
  keeps that stream's ``SSLObject`` and memory BIOs and drives them straight over the socket
  (the same connection and keys; the SSLStream stays the owner that closes the socket). The
  session tickets trio holds back until a TLS 1.3 server's first send go out ahead of ours. It
  reaches trio's private attributes: if they are ever renamed, ``take_over`` returns None and
  the caller keeps using the SSLStream (slower, same bytes).
- Receiving: decrypt what the incoming BIO holds (every whole record, up to the limit);
  without a whole record, read the socket once, non-blocking. A read that came back short
  emptied the socket, so the next receive waits for readability first instead of trying a
  read that would fail. Each receive yields exactly once, in that wait or in a checkpoint
  after the data, as trio's streams do: a peer that never stops sending starves no task.
- Sending is synchronous: ``send_nowait`` encrypts and writes into the socket at once.
  Ciphertext the kernel cannot take waits in a FIFO backlog and ``flush`` writes it out when
  the socket is writable (one task at a time: the caller serialises flushes). Encryption
  happens in call order and the backlog is FIFO, so the bytes of sends from different tasks
  never interleave, and a flush cancelled half-way loses nothing: the next one resumes it.
- A socket error is kept and raised (``trio.BrokenResourceError``) by the next receive,
  flush or send; ``send_nowait`` itself never raises for it, so a task that only queued a
  message is not the one that learns the tunnel broke.
"""

from __future__ import annotations

import os
import ssl
from collections import deque
from typing import Any

import trio

READ_SIZE = 256 * 1024  # bytes per read from the socket


class TlsSocket:
    """A TLS connection over a trio socket, driven without an SSLStream (see module doc)."""

    def __init__(
        self,
        ssl_object: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        sock: trio.socket.SocketType,
    ) -> None:
        self._ssl = ssl_object
        self._incoming = incoming
        self._outgoing = outgoing
        self._socket = sock
        self._backlog: deque[memoryview] = deque()  # ciphertext the kernel did not take yet
        self._drained = False  # the last read emptied the socket: wait before reading again
        self._eof = False
        self._error: BaseException | None = None
        self._held_back = b""  # ciphertext that goes out ahead of our first send

    @classmethod
    def take_over(cls, stream: trio.abc.Stream) -> TlsSocket | None:
        """A ``TlsSocket`` on the handshaken TLS connection ``stream``, or None when ``stream``
        is not an SSLStream over a socket whose state we can take (then keep using it)."""
        if not isinstance(stream, trio.SSLStream):
            return None
        transport: Any = stream.transport_stream
        if not isinstance(transport, trio.SocketStream):
            return None
        ssl_object = getattr(stream, "_ssl_object", None)
        incoming = getattr(stream, "_incoming", None)
        outgoing = getattr(stream, "_outgoing", None)
        if not (
            isinstance(ssl_object, ssl.SSLObject)
            and isinstance(incoming, ssl.MemoryBIO)
            and isinstance(outgoing, ssl.MemoryBIO)
        ):
            return None
        if ssl_object.version() is None or outgoing.pending:
            return None  # no handshake yet, or bytes trio has still to send
        # trio holds a TLS 1.3 server's session tickets back until its first send: they must
        # go out before our first record, or the client cannot decrypt it.
        delayed = getattr(stream, "_delayed_outgoing", None)
        if not (delayed is None or isinstance(delayed, bytes)):
            return None
        tls = cls(ssl_object, incoming, outgoing, transport.socket)
        if delayed:
            stream._delayed_outgoing = None
            tls._held_back = delayed
        return tls

    # ------------------------------------------------------------------ receiving

    async def receive_some(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` decrypted bytes; ``b""`` at EOF.

        Raises:
            trio.BrokenResourceError: the socket or the TLS layer failed.
            trio.ClosedResourceError: the socket was closed.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while (data := self._decrypt(max_bytes)) is None:
            if self._drained:
                self._check_open()
                await trio.lowlevel.wait_readable(self._socket)
                waited = True
            self._read_socket()
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    def _decrypt(self, max_bytes: int) -> bytes | None:
        """The plaintext the BIO's whole records hold (up to ``max_bytes``), ``b""`` at EOF,
        or None if a record is still incomplete."""
        pieces: list[bytes] = []
        size = 0
        try:
            while size < max_bytes:
                piece = self._ssl.read(max_bytes - size)
                if not piece:
                    break
                pieces.append(piece)
                size += len(piece)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:  # the peer's close_notify
            self._eof = True
        except ssl.SSLError as exc:
            self._error = exc
            raise trio.BrokenResourceError(f"TLS failed: {exc}") from exc
        if self._outgoing.pending:  # a post-handshake message (key update) to answer
            self._queue(self._outgoing.read())
        if pieces:
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if self._eof:
            return b""
        return None

    def _read_socket(self) -> None:
        """Read the socket once (it may be empty) into the incoming BIO."""
        self._check_open()
        try:
            chunk = os.read(self._socket.fileno(), READ_SIZE)
        except BlockingIOError:
            self._drained = True
            return
        except OSError as exc:
            self._error = exc
            raise trio.BrokenResourceError(f"the tunnel socket failed: {exc}") from exc
        self._drained = len(chunk) < READ_SIZE
        if chunk:
            self._incoming.write(chunk)
        else:
            self._eof = True  # trio's https_compatible: an EOF without close_notify is EOF

    # ------------------------------------------------------------------ sending

    def send_nowait(self, data: bytes) -> bool:
        """Encrypt ``data`` and write it now; False if some of it waits for ``flush``.

        Raises:
            trio.ClosedResourceError: the socket was closed.
            trio.BrokenResourceError: TLS failed on this connection before (as SSLStream).
        """
        if self._socket.fileno() == -1:
            raise trio.ClosedResourceError("the tunnel socket was closed")
        try:
            self._ssl.write(data)
        except ssl.SSLError as exc:  # a failed connection (a bad record seen): it stays failed
            self._error = self._error or exc
            raise trio.BrokenResourceError(f"TLS failed: {exc}") from exc
        self._queue(self._outgoing.read())
        return not self._backlog

    def _queue(self, ciphertext: bytes) -> None:
        if self._held_back:
            ciphertext, self._held_back = self._held_back + ciphertext, b""
        if not ciphertext:
            return
        if self._backlog or self._error is not None:
            self._backlog.append(memoryview(ciphertext))
            return
        sent = self._write(ciphertext)
        if sent < len(ciphertext):
            self._backlog.append(memoryview(ciphertext)[sent:])

    def _write(self, data: bytes | memoryview) -> int:
        try:
            return os.write(self._socket.fileno(), data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            self._error = exc
            return 0

    @property
    def backlog(self) -> bool:
        """Whether ciphertext waits for ``flush``."""
        return bool(self._backlog)

    async def flush(self) -> None:
        """Write the backlog out, waiting for the socket as needed (one task at a time).

        Raises:
            trio.BrokenResourceError: the socket failed.
            trio.ClosedResourceError: the socket was closed.
        """
        while self._backlog:
            self._check_open()
            await trio.lowlevel.wait_writable(self._socket)
            while self._backlog:
                head = self._backlog[0]
                sent = self._write(head)
                self._check_open()
                if sent < len(head):
                    self._backlog[0] = head[sent:]
                    break
                self._backlog.popleft()

    async def send_all(self, data: bytes) -> None:
        """Send ``data``: ``send_nowait``, then ``flush`` if the kernel did not take it all."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.send_nowait(data) and self._error is None:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        await self.flush()
        self._check_open()

    def _check_open(self) -> None:
        if self._error is not None:
            raise trio.BrokenResourceError(f"the tunnel socket failed: {self._error}")
        if self._socket.fileno() == -1:
            raise trio.ClosedResourceError("the tunnel socket was closed")
