"""The floor of petit's design: its relay with none of its features, for the bench's TCP rows.

Two trio processes joined by one TLS connection, driven as petit drives it
(``petit.tlsio.TlsSocket``), carrying streams in 9-byte-header frames: no WebSocket, no
registration, no flow control, no limits, no logging. The server relays one public TCP port;
the client opens a connection to its target for each stream. Every hop is what petit's
fastest path does: wait for readability, one read, encrypt and write at once from the task
that read; the tunnel's reader writes each payload straight into its socket. So the gap
between this and petit is what petit's features and layers cost, and the gap between this
and ``ssh -R`` is what trio and Python cost.

    python bench/floor.py server PUBLIC_PORT TUNNEL_PORT CERT KEY
    python bench/floor.py client TUNNEL_PORT CA TARGET_PORT

Not a product: a peer that misbehaves is not handled, only measured against.
"""

from __future__ import annotations

import os
import ssl
import struct
import sys

import trio

from petit.tlsio import TlsSocket

HEADER = struct.Struct("!BII")  # kind, stream id, payload length
OPEN, DATA, END = 0, 1, 2
READ_SIZE = 256 * 1024


class Tunnel:
    """One TLS connection carrying framed streams; each end's sockets by stream id."""

    def __init__(self, tls: TlsSocket) -> None:
        self.tls = tls
        self.sockets: dict[int, trio.socket.SocketType] = {}
        self._flushing = trio.Lock()  # TlsSocket.flush takes one task at a time

    async def send(self, kind: int, stream_id: int, payload: bytes = b"") -> None:
        """Frame and send from the calling task, waiting only when the socket is full."""
        if not self.tls.send_nowait(HEADER.pack(kind, stream_id, len(payload)) + payload):
            async with self._flushing:
                await self.tls.flush()

    async def pump_out(self, stream_id: int, sock: trio.socket.SocketType) -> None:
        """One socket into the tunnel until its EOF."""
        fd = sock.fileno()
        try:
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    chunk = os.read(fd, READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                await self.send(DATA, stream_id, chunk)
        finally:
            self.sockets.pop(stream_id, None)
            sock.close()
            await self.send(END, stream_id)

    async def pump_in(self, on_open: object = None) -> None:
        """The tunnel into the sockets: each payload written straight into its socket."""
        buffer = b""
        while data := await self.tls.receive_some(READ_SIZE):
            frames, buffer = split_frames(buffer + data)
            for kind, stream_id, payload in frames:
                if kind == OPEN and callable(on_open):
                    await on_open(stream_id)
                elif kind == DATA and (sock := self.sockets.get(stream_id)) is not None:
                    await _write_all(sock, payload)
                elif kind == END and (sock := self.sockets.get(stream_id)) is not None:
                    sock.shutdown(trio.socket.SHUT_WR)


def split_frames(buffer: bytes) -> tuple[list[tuple[int, int, bytes]], bytes]:
    """The complete frames at the start of ``buffer``, as (kind, stream id, payload), and
    the bytes after them (the start of the next frame)."""
    frames = []
    offset = 0
    while len(buffer) - offset >= HEADER.size:
        kind, stream_id, size = HEADER.unpack_from(buffer, offset)
        end = offset + HEADER.size + size
        if end > len(buffer):
            break
        frames.append((kind, stream_id, buffer[offset + HEADER.size : end]))
        offset = end
    return frames, buffer[offset:]


async def _write_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(sock.fileno(), view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
        except OSError:
            return


async def _tls_socket(stream: trio.SSLStream[trio.SocketStream]) -> TlsSocket:
    await stream.do_handshake()
    tls = TlsSocket.take_over(stream)
    assert tls is not None, "trio's SSLStream internals changed"
    return tls


async def serve(public_port: int, tunnel_port: int, cert: str, key: str) -> None:
    """Accept one client on the tunnel port, then relay the public port through it."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    listeners = await trio.open_tcp_listeners(tunnel_port, host="127.0.0.1")
    while True:  # the first connection that completes TLS (not a probe of the port)
        stream = await listeners[0].accept()
        try:
            tunnel = Tunnel(await _tls_socket(trio.SSLStream(stream, context, server_side=True)))
            break
        except trio.BrokenResourceError:
            await trio.aclose_forcefully(stream)
    public = await trio.open_tcp_listeners(public_port, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tunnel.pump_in)
        next_id = 0
        while True:
            caller = await public[0].accept()
            next_id += 1
            tunnel.sockets[next_id] = caller.socket
            await tunnel.send(OPEN, next_id)
            nursery.start_soon(tunnel.pump_out, next_id, caller.socket)


async def dial(tunnel_port: int, ca: str, target_port: int) -> None:
    """Connect to the server; for each stream it opens, connect to the target and relay."""
    context = ssl.create_default_context(cafile=ca)
    stream = await trio.open_tcp_stream("127.0.0.1", tunnel_port)
    tunnel = Tunnel(await _tls_socket(trio.SSLStream(stream, context, server_hostname="localhost")))
    async with trio.open_nursery() as nursery:

        async def on_open(stream_id: int) -> None:
            target = await trio.open_tcp_stream("127.0.0.1", target_port)
            tunnel.sockets[stream_id] = target.socket
            nursery.start_soon(tunnel.pump_out, stream_id, target.socket)

        await tunnel.pump_in(on_open)
        nursery.cancel_scope.cancel()


def main() -> None:
    """``server`` or ``client``, see the module doc."""
    role, *args = sys.argv[1:]
    if role == "server":
        trio.run(serve, int(args[0]), int(args[1]), args[2], args[3])
    else:
        trio.run(dial, int(args[0]), args[1], int(args[2]))


if __name__ == "__main__":
    main()
