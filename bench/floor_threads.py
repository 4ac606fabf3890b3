"""The floor without trio: floor.py's relay on OS threads and blocking sockets.

The same wire as floor.py (one TLS connection, 9-byte-header frames, a connection to the
target per stream), but no event loop: a thread per socket blocks in recv(), so each hop is
one wake-up by the kernel instead of epoll and a scheduler round. TLS goes through
``ssl.MemoryBIO`` under one lock, since OpenSSL's connection object is not for two threads
at once. If this beats floor.py, the scheduler is the ceiling; if it does not reach
``ssh -R`` either, Python itself is.

    python bench/floor_threads.py server PUBLIC_PORT TUNNEL_PORT CERT KEY
    python bench/floor_threads.py client TUNNEL_PORT CA TARGET_PORT

Not a product: a peer that misbehaves is not handled, only measured against.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import sys
import threading
from collections.abc import Callable

from floor import DATA, END, HEADER, OPEN, READ_SIZE, split_frames


class Tunnel:
    """One TLS connection carrying framed streams; each end's sockets by stream id."""

    def __init__(
        self,
        sock: socket.socket,
        tls: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
    ) -> None:
        self.sock = sock
        self.tls = tls
        self.incoming = incoming
        self.outgoing = outgoing
        self.outgoing_lock = threading.Lock()  # one writer of TLS records and of the socket
        self.tls_lock = threading.Lock()  # the SSLObject, read and written by several threads
        self.sockets: dict[int, socket.socket] = {}

    @classmethod
    def handshake(
        cls, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool
    ) -> Tunnel:
        """TLS over ``sock`` (blocking); ssl.SSLError if the peer is not a TLS client."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        name = None if server_side else "localhost"
        tls = context.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=name)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                data = sock.recv(READ_SIZE)
                if not data:
                    raise ssl.SSLError("the peer closed during the handshake") from None
                incoming.write(data)
        if outgoing.pending:
            sock.sendall(outgoing.read())
        return cls(sock, tls, incoming, outgoing)

    def send(self, kind: int, stream_id: int, payload: bytes = b"") -> None:
        """Frame, encrypt and write from the calling thread."""
        with self.outgoing_lock:
            with self.tls_lock:
                self.tls.write(HEADER.pack(kind, stream_id, len(payload)) + payload)
                ciphertext = self.outgoing.read()
            self.sock.sendall(ciphertext)

    def pump_out(self, stream_id: int, sock: socket.socket) -> None:
        """One socket into the tunnel until its EOF."""
        try:
            while True:
                try:
                    chunk = sock.recv(READ_SIZE)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                self.send(DATA, stream_id, chunk)
        finally:
            self.sockets.pop(stream_id, None)
            sock.close()
            self.send(END, stream_id)

    def pump_in(self, on_open: Callable[[int], None] | None = None) -> None:
        """The tunnel into the sockets: each payload written straight into its socket."""
        buffer = b""
        while data := self.sock.recv(READ_SIZE):
            with self.tls_lock:
                self.incoming.write(data)
                while True:
                    try:
                        plaintext = self.tls.read(READ_SIZE)
                    except ssl.SSLWantReadError:
                        break
                    if not plaintext:  # the peer's close_notify
                        return
                    buffer += plaintext
            frames, buffer = split_frames(buffer)
            for kind, stream_id, payload in frames:
                if kind == OPEN and on_open is not None:
                    on_open(stream_id)
                elif kind == DATA and (sock := self.sockets.get(stream_id)) is not None:
                    with contextlib.suppress(OSError):
                        sock.sendall(payload)
                elif kind == END and (sock := self.sockets.get(stream_id)) is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)


def _connected(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _start(target: Callable[..., None], *args: object) -> None:
    threading.Thread(target=target, args=args, daemon=True).start()


def serve(public_port: int, tunnel_port: int, cert: str, key: str) -> None:
    """Accept one client on the tunnel port, then relay the public port through it."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", tunnel_port))
    while True:  # the first connection that completes TLS (not a probe of the port)
        sock, _ = listener.accept()
        try:
            tunnel = Tunnel.handshake(_connected(sock), context, server_side=True)
            break
        except (ssl.SSLError, OSError):
            sock.close()
    _start(tunnel.pump_in)
    public = socket.create_server(("127.0.0.1", public_port))
    next_id = 0
    while True:
        caller, _ = public.accept()
        next_id += 1
        tunnel.sockets[next_id] = _connected(caller)
        tunnel.send(OPEN, next_id)
        _start(tunnel.pump_out, next_id, caller)


def dial(tunnel_port: int, ca: str, target_port: int) -> None:
    """Connect to the server; for each stream it opens, connect to the target and relay."""
    context = ssl.create_default_context(cafile=ca)
    sock = _connected(socket.create_connection(("127.0.0.1", tunnel_port)))
    tunnel = Tunnel.handshake(sock, context, server_side=False)

    def on_open(stream_id: int) -> None:
        target = _connected(socket.create_connection(("127.0.0.1", target_port)))
        tunnel.sockets[stream_id] = target
        _start(tunnel.pump_out, stream_id, target)

    tunnel.pump_in(on_open)


def main() -> None:
    """``server`` or ``client``, see the module doc."""
    role, *args = sys.argv[1:]
    if role == "server":
        serve(int(args[0]), int(args[1]), args[2], args[3])
    else:
        dial(int(args[0]), args[1], int(args[2]))


if __name__ == "__main__":
    main()
