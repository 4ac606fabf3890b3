"""petit's WebSocket against another implementation (trio-websocket), over real TLS on loopback.

The tunnel's wire is standard WebSocket so that HTTP proxies and ingress controllers pass it;
these tests hold petit's own engine to that: its client talks to trio-websocket's server and
trio-websocket's client talks to its server, with big binary messages, text, pings and close
codes. They also check the listener refuses what is not an upgrade and outlives it.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio
import trio_websocket
import trustme

from petit.pki import client_ssl_context
from petit.transport import ServerAddress, open_websocket
from petit.websocket import UpgradeRequest, serve_websocket

pytestmark = pytest.mark.integration

TIMEOUT = 20  # seconds per test
BIG = 5 * 1024 * 1024  # bytes: a 5 MiB message each way


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext, Path]:
    """(server context, client context, CA file) for the name 127.0.0.1."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca.cert_pem.write_to_path(tmp_path / "ca.crt")
    return server_context, client_ssl_context(tmp_path / "ca.crt"), tmp_path / "ca.crt"


async def serve_on_loopback(
    nursery: trio.Nursery,
    handler: Callable[[UpgradeRequest], Awaitable[None]],
    context: ssl.SSLContext,
    handshake_timeout: float,
) -> int:
    """petit's WebSocket server on 127.0.0.1, a port of the system's choosing; that port."""
    port: int = await nursery.start(
        partial(
            serve_websocket,
            handler,
            context,
            host="127.0.0.1",
            port=0,
            handler_nursery=nursery,
            handshake_timeout=handshake_timeout,
        )
    )
    return port


async def echo(websocket: trio_websocket.WebSocketConnection) -> None:
    """Echo messages until the peer closes."""
    try:
        while True:
            await websocket.send_message(await websocket.get_message())
    except trio_websocket.ConnectionClosed:
        pass


async def test_petit_client_against_trio_websocket_server(
    tls: tuple[ssl.SSLContext, ssl.SSLContext, Path],
) -> None:
    server_context, client_context, _ = tls
    payload = os.urandom(BIG)

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        await echo(await request.accept())

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(
                    trio_websocket.serve_websocket,
                    handler,
                    "127.0.0.1",
                    0,
                    server_context,
                    max_message_size=2 * BIG,
                )
            )
            address = ServerAddress("127.0.0.1", server.port)
            async with open_websocket(address, client_context, "/echo") as (websocket, _):
                await websocket.send_message("text, é")
                assert await websocket.get_message() == "text, é".encode()
                await websocket.send(payload)
                received = bytearray()
                while len(received) < BIG:
                    received += await websocket.receive()
                assert received == payload
            nursery.cancel_scope.cancel()


async def test_trio_websocket_client_against_petit_server(
    tls: tuple[ssl.SSLContext, ssl.SSLContext, Path],
) -> None:
    server_context, client_context, _ = tls
    payload = os.urandom(BIG)
    closed: list[str] = []

    async def handler(request: UpgradeRequest) -> None:
        if request.path != "/echo":
            await request.reject(404)
            return
        websocket = await request.accept()
        while data := await websocket.get_message(limit=2 * BIG):
            await websocket.send_message(data)
            if data == b"bye":
                break
        closed.append("handler done")

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await serve_on_loopback(nursery, handler, server_context, TIMEOUT)
            url = f"wss://127.0.0.1:{port}/echo"
            async with trio_websocket.open_websocket_url(
                url, client_context, max_message_size=2 * BIG
            ) as websocket:
                await websocket.ping(b"ping payload")  # returns once the pong came back
                await websocket.send_message(payload)
                assert await websocket.get_message() == payload
                await websocket.send_message(b"bye")
                assert await websocket.get_message() == b"bye"
                # The handler returned: the server closes with 1000.
                with pytest.raises(trio_websocket.ConnectionClosed) as closing:
                    await websocket.get_message()
                reason = closing.value.reason
                assert reason is not None
                assert reason.code == 1000
            assert closed == ["handler done"]
            with pytest.raises(trio_websocket.ConnectionRejected) as refused:
                async with trio_websocket.open_websocket_url(
                    f"wss://127.0.0.1:{port}/elsewhere", client_context
                ):
                    pass
            assert refused.value.status_code == 404
            nursery.cancel_scope.cancel()


async def test_the_listener_answers_non_upgrades_and_idle_connections_and_goes_on(
    tls: tuple[ssl.SSLContext, ssl.SSLContext, Path],
) -> None:
    """Plain HTTPS gets an HTTP error; a silent TCP client is dropped after the handshake
    timeout; the listener then still serves a real WebSocket."""
    server_context, client_context, _ = tls

    async def handler(request: UpgradeRequest) -> None:
        websocket = await request.accept()
        await websocket.send_message(b"welcome")

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await serve_on_loopback(nursery, handler, server_context, 1.0)
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            plain = trio.SSLStream(tcp, client_context, server_hostname="127.0.0.1")
            await plain.send_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = await plain.receive_some()
            assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 426 ")), answer
            await plain.aclose()

            silent = await trio.open_tcp_stream("127.0.0.1", port)
            with trio.fail_after(5):  # dropped after the 1 s handshake timeout
                assert await silent.receive_some() == b""
            await silent.aclose()

            address = ServerAddress("127.0.0.1", port)
            async with open_websocket(address, client_context, "/") as (websocket, _):
                assert await websocket.get_message() == b"welcome"
            nursery.cancel_scope.cancel()
