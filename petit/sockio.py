"""Reads and writes on a plain socket without trio's per-call machinery (``petit.tlsio`` is
the same for TLS).

trio's ``SocketStream.receive_some`` tries the read first, and on a connection that waits
for its peer (an HTTP keep-alive connection between requests) that read fails with EAGAIN
before the wait; ``send_all`` always yields once more after the kernel took the bytes. On a
small request each costs about as much as the syscall itself. Here a receive waits for
readability first, then reads once; a send writes at once and only waits (``send_all``)
for what the kernel did not take. Any other stream (TLS) is passed to its own methods, so
callers need not care which they hold.

Each function is one checkpoint at most, not always one: ``send`` yields only when it has
to wait, so a caller looping on it must reach a checkpoint elsewhere (a relay's next
receive is one).
"""

from __future__ import annotations

import fcntl
import os
import sys
import termios

import trio

# The ioctl that reads a socket's send queue (Linux: SIOCOUTQ, the same number); None where
# the platform has none, and then nothing is known to be queued.
_OUTQ = getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None


async def receive(stream: trio.abc.ReceiveStream, max_bytes: int) -> bytes:
    """``stream.receive_some(max_bytes)``; for a socket, a wait for readability then one read.

    Raises:
        trio.BrokenResourceError: the connection failed (reset).
        trio.ClosedResourceError: the stream was closed.
    """
    if not isinstance(stream, trio.SocketStream):
        return bytes(await stream.receive_some(max_bytes))
    sock = stream.socket
    while True:
        if sock.fileno() == -1:
            raise trio.ClosedResourceError("the socket was closed")
        await trio.lowlevel.wait_readable(sock)
        try:
            return os.read(sock.fileno(), max_bytes)
        except BlockingIOError:
            continue  # woken without data (another reader): wait again
        except OSError as exc:
            if sock.fileno() == -1:
                raise trio.ClosedResourceError("the socket was closed") from None
            raise trio.BrokenResourceError(f"the connection failed: {exc}") from exc


async def send(stream: trio.abc.SendStream, data: bytes) -> None:
    """``stream.send_all(data)``; for a socket, one write at once and a wait only for the
    rest. Not a checkpoint when the kernel takes it all.

    Raises:
        trio.BrokenResourceError: the connection failed (reset, or closed by the peer).
        trio.ClosedResourceError: the stream was closed.
    """
    if not isinstance(stream, trio.SocketStream):
        await stream.send_all(data)
        return
    fileno = stream.socket.fileno()
    if fileno == -1:
        raise trio.ClosedResourceError("the socket was closed")
    try:
        written = os.write(fileno, data)
    except BlockingIOError:
        written = 0
    except OSError as exc:
        raise trio.BrokenResourceError(f"the connection failed: {exc}") from exc
    if written < len(data):
        await stream.send_all(memoryview(data)[written:])


def unsent_bytes(sock: trio.socket.SocketType) -> int:
    """Bytes written into ``sock`` that its peer has not acknowledged yet: what a caller that
    reads slowly leaves in the kernel. 0 when closed or unknown."""
    fileno = sock.fileno()
    if _OUTQ is None or fileno == -1:
        return 0
    try:
        return int.from_bytes(fcntl.ioctl(fileno, _OUTQ, bytes(4)), sys.byteorder, signed=True)
    except OSError:
        return 0
