"""WebSocket through the ingress (ws:// and wss://): real WebSocket clients and servers
(trio-websocket) on both ends of a real petit server and client.

The caller's upgrade goes to the private service with its Upgrade and Connection headers;
after the service's 101, bytes flow both ways as they are, with flow control, until either
side closes. A refused upgrade is relayed as the service's answer.
"""

from __future__ import annotations

import os
import ssl
from functools import partial
from pathlib import Path

import pytest
import trio
import trio_websocket
import trustme

from tests.integration.harness import (
    ClientFactory,
    PetitServer,
    ServerFactory,
    http_request,
    wait_until,
)

pytestmark = pytest.mark.integration

TIMEOUT = 30.0  # seconds per test
BIG = 5 * 1024 * 1024  # bytes in one binary message
LIMIT = 2 * BIG  # both ends' message size limit


async def chat_service(request: trio_websocket.WebSocketRequest) -> None:
    """The private service: /chat echoes, closing with 4001 on "bye"; anything else 403."""
    if request.path != "/chat":
        await request.reject(403, body=b"no chat here")
        return
    websocket = await request.accept()
    try:
        while True:
            message = await websocket.get_message()
            if message == "bye":
                await websocket.aclose(code=4001, reason="see you")
                return
            await websocket.send_message(message)
    except trio_websocket.ConnectionClosed:
        pass


async def caller(
    nursery: trio.Nursery, server: PetitServer, host: str, resource: str
) -> trio_websocket.WebSocketConnection:
    """A WebSocket client through the HTTP ingress, sending ``Host: host``."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.http_port)
    return await trio_websocket.wrap_client_stream(
        nursery, stream, host, resource, max_message_size=LIMIT
    )


async def test_a_websocket_passes_through_both_ways_until_closed(
    server: PetitServer, client_factory: ClientFactory, nursery: trio.Nursery
) -> None:
    service = await nursery.start(
        partial(
            trio_websocket.serve_websocket,
            chat_service,
            "127.0.0.1",
            0,
            None,
            max_message_size=LIMIT,
        )
    )
    client = await client_factory(server, service.port)
    added = await server.control(f"ADDALIAS {client.registration_id} chat.example.com")
    assert added["success"] is True, added
    payload = os.urandom(BIG)
    with trio.fail_after(TIMEOUT):
        for host in (client.host, "chat.example.com"):  # by ID and through an alias
            async with trio.open_nursery() as connections:
                websocket = await caller(connections, server, host, "/chat")
                await websocket.send_message("hello, é")
                assert await websocket.get_message() == "hello, é"
                await websocket.send_message(payload)
                assert await websocket.get_message() == payload
                await websocket.ping(b"are you there")  # returns once the pong came back
                await websocket.send_message("bye")
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await websocket.get_message()
                reason = closed.value.reason
                assert reason is not None
                assert (reason.code, reason.reason) == (4001, "see you")
                connections.cancel_scope.cancel()
        # Plain requests still reach the service afterwards (it answers them 400: no upgrade).
        plain = await http_request(server.http_port, client.host, target="/chat")
        assert plain.status == 400, plain


IDLE_TIMEOUT = 0.5  # seconds: the server's idleTimeout and responseTimeout in the next test


async def test_a_secure_websocket_outlives_the_timeouts_and_counts_in_usage(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """wss:// through the HTTPS ingress: a WebSocket left silent for four idle timeouts is
    still open (idleTimeout is for the wait between requests, responseTimeout for a response
    head, neither for a switched connection), and its bytes count in the registration's
    usage as a 101."""
    ca = trustme.CA()
    leaf = ca.issue_cert("chat.example.test")
    certificate, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    server = await server_factory(
        secureProxyPort=0,
        httpsCertificate=str(certificate),
        httpsKey=str(key),
        idleTimeout=IDLE_TIMEOUT,
        responseTimeout=IDLE_TIMEOUT,
    )
    service = await nursery.start(
        partial(trio_websocket.serve_websocket, chat_service, "127.0.0.1", 0, None)
    )
    client = await client_factory(server, service.port)
    added = await server.control(f"ADDALIAS {client.registration_id} chat.example.test")
    assert added["success"] is True, added
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as connections:
            stream = trio.SSLStream(
                await trio.open_tcp_stream("127.0.0.1", server.ports["https"]),
                context,
                server_hostname="chat.example.test",
                https_compatible=True,
            )
            websocket = await trio_websocket.wrap_client_stream(
                connections, stream, "chat.example.test", "/chat"
            )
            await websocket.send_message("before")
            assert await websocket.get_message() == "before"
            await trio.sleep(4 * IDLE_TIMEOUT)  # the silence under test, not synchronisation
            await websocket.send_message("after")
            assert await websocket.get_message() == "after"
            await websocket.aclose()
            connections.cancel_scope.cancel()
    seen: dict[str, object] = {}

    async def counted() -> bool:  # once the server has seen both ends close
        seen.update(await server.admin_json(f"/usage/{client.registration_id}"))
        return seen["requests"] == 1

    await wait_until(counted, TIMEOUT, what="the WebSocket in the usage")
    usage = seen
    statuses = usage["statuses"]
    assert isinstance(statuses, dict), usage
    assert statuses["1xx"] == 1, usage
    for way in ("bytesIn", "bytesOut"):
        carried = usage[way]
        assert isinstance(carried, int), usage
        assert carried > len("before" + "after"), usage


async def test_a_refused_upgrade_is_relayed_as_the_services_answer(
    server: PetitServer, client_factory: ClientFactory, nursery: trio.Nursery
) -> None:
    service = await nursery.start(
        partial(trio_websocket.serve_websocket, chat_service, "127.0.0.1", 0, None)
    )
    client = await client_factory(server, service.port)
    upgrade = [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ]
    with trio.fail_after(TIMEOUT):
        refused = await http_request(
            server.http_port, client.host, target="/elsewhere", headers=upgrade
        )
    assert (refused.status, refused.body) == (403, b"no chat here")
