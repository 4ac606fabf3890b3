"""Handshaken client/server ``TunnelSession`` pairs over in-memory streams, or over TLS
WebSockets on loopback as in production.

The handshake is the real one (Ed25519 hello over a fixed nonce), so the sessions under test
went through exactly the states the services drive them through.
"""

from __future__ import annotations

import hashlib
import json
import math
import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import trio
import trio.testing

from petit import ca as issuing, pki
from petit.auth import (
    Hello,
    accepted_ids,
    decode_hello,
    decode_window,
    encode_hello,
    generate_key,
    hello_transcript,
    parse_json_object,
    public_key_raw,
    sign,
)
from petit.connection import DEFAULT_WINDOW, Role, TunnelConnection
from petit.errors import AuthError
from petit.session import Carrier, StreamCarrier, StreamHandler, TunnelSession, TunnelStream
from petit.websocket import WebSocket, connect, read_upgrade

NONCE = bytes(range(32))
FINGERPRINT = hashlib.sha256(b"the test server certificate").digest()
REGISTRATION_ID = "1001"
QUIET_PING_INTERVAL = 3600.0  # seconds: no keepalive traffic during a (real-time) test

_KEY = generate_key()
_PUBLIC_KEYS = {REGISTRATION_ID: public_key_raw(_KEY)}


class StallableCarrier(StreamCarrier):
    """A StreamCarrier that can stop delivering: ``stalled`` makes ``receive`` hang forever.

    This is a half-open tunnel as the keepalive sees it: sends succeed, nothing arrives.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        super().__init__(stream)
        self.stalled = False

    async def receive(self) -> bytes:
        if self.stalled:
            await trio.sleep_forever()
        return await super().receive()


class Acceptor:
    """A client stream handler that accepts every stream and hands it to the test.

    The handler task then waits forever: its return would close the stream, and the test
    owns the stream from now on.
    """

    def __init__(self) -> None:
        self._send, self.streams = trio.open_memory_channel[TunnelStream](math.inf)
        self.targets: list[str] = []

    async def __call__(self, stream: TunnelStream, target: str) -> None:
        stream.accept()
        self.targets.append(target)
        self._send.send_nowait(stream)
        await trio.sleep_forever()


class Served:
    """One session's ``serve()`` in a task of its own; the outcome is kept for assertions."""

    def __init__(self, session: TunnelSession) -> None:
        self.session = session
        self.cancel_scope = trio.CancelScope()
        self.finished = trio.Event()
        self.error: Exception | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self.cancel_scope:
            try:
                await self.session.serve(task_status=task_status)
            except Exception as exc:  # noqa: BLE001 - kept for the test to assert on
                self.error = exc
        self.finished.set()


async def handshake(
    client: TunnelSession,
    server: TunnelSession,
    *,
    old_client: bool = False,
    old_server: bool = False,
) -> None:
    """Run both halves of the handshake concurrently, settling the windows as the services
    do. An old peer announces no window and never settles: it assumes DEFAULT_WINDOW."""

    def make_hello(nonce: bytes) -> bytes:
        transcript = hello_transcript(nonce, FINGERPRINT, [REGISTRATION_ID])
        window = None if old_client else client.connection.offered_window
        return encode_hello(Hello(claims={REGISTRATION_ID: sign(_KEY, transcript)}, window=window))

    async def check_hello(payload: bytes) -> bytes:
        hello = decode_hello(payload)
        ids = accepted_ids(hello, NONCE, FINGERPRINT, _PUBLIC_KEYS.get)
        if not ids:
            raise AuthError("no claimed registration could be verified")
        if old_server:
            return json.dumps({"accepted": ids}).encode()
        server.connection.settle_windows(hello.window)
        return json.dumps({"accepted": ids, "window": server.connection.offered_window}).encode()

    async def client_half() -> None:
        welcome = parse_json_object(await client.handshake_as_client(make_hello), what="welcome")
        if not old_client:
            client.connection.settle_windows(decode_window(welcome, what="welcome"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handshake_as_server, NONCE, check_hello)
        nursery.start_soon(client_half)


@dataclass
class SessionPair:
    """Two handshaken sessions, both serving."""

    client: Served
    server: Served
    acceptor: Acceptor | None
    client_transport: trio.abc.Stream  # what the client's carrier runs over

    async def open_stream_pair(
        self, target: str = REGISTRATION_ID
    ) -> tuple[TunnelStream, TunnelStream]:
        """Open a stream from the server; return (server end, client end)."""
        assert self.acceptor is not None, "the pair was built with a custom handler"
        server_stream = await self.server.session.open_stream(target)
        client_stream = await self.acceptor.streams.receive()
        return server_stream, client_stream


def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts for "localhost" under a fresh CA."""
    ca = issuing.create_ca()
    issued = issuing.issue_server_certificate(ca, ["localhost"])
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        (root / "ca.crt").write_bytes(ca.cert_pem)
        (root / "server.crt").write_bytes(issued.cert_pem)
        (root / "server.key").write_bytes(issued.key_pem)
        server = pki.server_ssl_context(root / "server.crt", root / "server.key")
        client = pki.client_ssl_context(root / "ca.crt")
    return server, client


async def loopback_tcp_pair(
    send_buffer: int | None = None,
) -> tuple[trio.SocketStream, trio.SocketStream]:
    """(client, server) TCP connected on 127.0.0.1; ``send_buffer`` shrinks both kernel send
    buffers (bytes)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client_tcp = await trio.open_tcp_stream("127.0.0.1", port)
    server_tcp = await listeners[0].accept()
    await listeners[0].aclose()
    if send_buffer is not None:
        for tcp in (client_tcp, server_tcp):
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    return client_tcp, server_tcp


async def websocket_pair(send_buffer: int | None = None) -> tuple[WebSocket, WebSocket]:
    """(client, server) WebSockets over TLS over loopback TCP, upgraded as the services do;
    ``send_buffer`` shrinks both kernel send buffers (bytes)."""
    server_context, client_context = tls_contexts()
    client_tcp, server_tcp = await loopback_tcp_pair(send_buffer)
    port = client_tcp.socket.getpeername()[1]
    client_tls = trio.SSLStream(client_tcp, client_context, server_hostname="localhost")
    server_tls = trio.SSLStream(server_tcp, server_context, server_side=True)
    accepted: list[WebSocket] = []

    async def accept() -> None:
        await server_tls.do_handshake()
        request = await read_upgrade(server_tls, "127.0.0.1")
        assert request is not None
        accepted.append(await request.accept())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        await client_tls.do_handshake()
        client = await connect(client_tls, f"localhost:{port}", "/petit/v1")
    return client, accepted[0]


async def session_pair(
    nursery: trio.Nursery,
    *,
    handler: StreamHandler | None = None,
    client_window: int = DEFAULT_WINDOW,
    server_window: int = DEFAULT_WINDOW,
    old_client: bool = False,
    old_server: bool = False,
    ping_interval: float = QUIET_PING_INTERVAL,
    over_tls: bool = False,
    send_buffer: int | None = None,
) -> SessionPair:
    """Handshake a pair and start both ``serve()`` in ``nursery``.

    Without ``handler`` the client accepts every stream (see ``Acceptor``). Each side offers
    its ``*_window``; an old one (see ``handshake``) announces nothing. ``over_tls`` runs
    the pair over TLS WebSockets on loopback (``websocket_pair``) instead of memory streams.
    """
    acceptor = Acceptor() if handler is None else None
    client_carrier: Carrier
    server_carrier: Carrier
    if over_tls:
        client_carrier, server_carrier = await websocket_pair(send_buffer)
        client_stream: trio.abc.Stream = client_carrier._stream
    else:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        client_carrier, server_carrier = StreamCarrier(client_stream), StreamCarrier(server_stream)
    client = TunnelSession(
        TunnelConnection(Role.CLIENT, offered_window=client_window),
        client_carrier,
        ping_interval=ping_interval,
        stream_handler=handler or acceptor,
    )
    server = TunnelSession(
        TunnelConnection(Role.SERVER, offered_window=server_window),
        server_carrier,
        ping_interval=ping_interval,
    )
    await handshake(client, server, old_client=old_client, old_server=old_server)
    pair = SessionPair(Served(client), Served(server), acceptor, client_stream)
    await nursery.start(pair.server.run)
    await nursery.start(pair.client.run)
    return pair
