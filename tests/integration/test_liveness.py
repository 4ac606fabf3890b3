"""Dead and frozen clients go offline within two ping intervals (503, TCP port closed);
clients outlive server restarts."""

from __future__ import annotations

import signal

import pytest
import trio

from tests.integration.harness import (
    PING_INTERVAL,
    UNAVAILABLE,
    ClientFactory,
    PetitClient,
    PetitServer,
    PythonBackend,
    ServerFactory,
    free_port,
    free_port_block,
    http_request,
    wait_until,
)
from tests.integration.test_tcp_ports import LOOPBACK, accepts, refuses, registration_port

pytestmark = pytest.mark.integration

MARGIN = 0.5  # seconds for polling and scheduling on a loaded machine


async def assert_serves(server: PetitServer, client: PetitClient) -> None:
    response = await http_request(server.http_port, client.host, timeout=10)
    assert (response.status, response.body) == (200, PythonBackend.GET_BODY)


async def answers_503_within(server: PetitServer, client: PetitClient, bound: float) -> float:
    """Poll until requests for the client get 503; the bound is the assertion. Return the time."""
    began = trio.current_time()
    try:
        with trio.fail_after(bound):
            while True:
                response = await http_request(server.http_port, client.host, timeout=bound)
                if response.status == 503:
                    assert response.body == UNAVAILABLE
                    break
                assert response.status == 200, response
    except trio.TooSlowError:
        raise AssertionError(f"{client.host} still served {bound}s after its client died") from None
    return trio.current_time() - began


async def test_killed_client_is_offline_within_two_pings(
    server: PetitServer, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    client = await client_factory(server, python_backend.port)
    await assert_serves(server, client)

    client.kill(signal.SIGKILL)

    await answers_503_within(server, client, 2 * PING_INTERVAL + MARGIN)
    assert await server.sessions_of(client.registration_id) == 0


async def test_frozen_client_is_dropped_by_keepalive_then_reconnects(
    server_factory: ServerFactory, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    """SIGSTOP leaves the TCP connection open but silent: only the pings can tell."""
    server = await server_factory(firstPort=free_port_block(), tcpAddr=LOOPBACK)
    client = await client_factory(server, python_backend.port)
    await assert_serves(server, client)
    port = await registration_port(server, client.registration_id)
    await wait_until(lambda: accepts(port), 5, what=f"TCP port {port} to listen")
    since = (await client.control_status())["connectedSince"]

    bound = 2 * PING_INTERVAL + MARGIN
    client.kill(signal.SIGSTOP)
    try:
        # No EOF reaches the server: only the missing pongs can tell it the tunnel is dead.
        took = await answers_503_within(server, client, bound)
        await wait_until(lambda: refuses(port), bound - took, what=f"TCP port {port} to close")
    finally:
        client.kill(signal.SIGCONT)

    await client.wait_connected(not_since=since)
    await assert_serves(server, client)
    await wait_until(lambda: accepts(port), 5, what=f"TCP port {port} to listen again")


async def test_client_reconnects_after_server_restart(
    server_factory: ServerFactory, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    server = await server_factory(backPort=free_port())
    client = await client_factory(server, python_backend.port)
    await assert_serves(server, client)
    tunnel_port = server.tunnel_port
    since = (await client.control_status())["connectedSince"]

    await server.stop()

    async def disconnected() -> bool:
        return (await client.control_status())["status"] != "connected"

    await wait_until(disconnected, 5, what="the client to notice the server is gone")
    await server.start()
    assert server.tunnel_port == tunnel_port

    status = await client.wait_connected(not_since=since)
    assert status["lastError"] == ""
    await assert_serves(server, client)
    assert (await client.status())["status"] == "connected"
