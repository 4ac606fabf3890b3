"""Raw TCP ports: a registration's port listens exactly while it is online and carries bytes."""

from __future__ import annotations

import contextlib
import random
import shutil
import socket

import pytest
import trio

from petit_server.edge.hub import Attachment, Hub
from petit_server.edge.tcpports import TcpPorts
from petit_server.registry.base import Registration
from tests.integration.harness import (
    ClientFactory,
    PetitServer,
    PythonBackend,
    RedisServer,
    ServerFactory,
    free_port,
    free_port_block,
    http_request,
    log_records,
    run_cli,
    wait_until,
)
from tests.io.helpers import REGISTRATION_ID, session_pair

pytestmark = pytest.mark.integration

REDIS_CLI = shutil.which("redis-cli")
LOOPBACK = "127.0.0.1"  # tcpAddr in every test: registration ports from a free one up
PORT_BOUND = 5.0  # seconds for a TCP port to open or close after its client came or went


async def accepts(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port."""
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return False
    await trio.aclose_forcefully(stream)
    return True


async def refuses(port: int) -> bool:
    return not await accepts(port)


async def registration_port(server: PetitServer, registration_id: str) -> int:
    reply = await server.control(f"STATUS {registration_id}")
    connections = reply["connections"]
    assert isinstance(connections, list), reply
    port = connections[0]["port"]
    assert isinstance(port, int), reply
    return port


async def redis_cli(port: int, *command: str) -> str:
    assert REDIS_CLI is not None
    result = await run_cli([REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), *command], timeout=10)
    return result.stdout.strip()


@pytest.mark.skipif(REDIS_CLI is None, reason="redis-cli is not installed")
async def test_redis_through_the_registration_port_while_the_client_is_online(
    server_factory: ServerFactory, client_factory: ClientFactory, redis_server: RedisServer
) -> None:
    server = await server_factory(firstPort=free_port_block(), tcpAddr=LOOPBACK)
    client = await client_factory(server, redis_server.port)
    port = await registration_port(server, client.registration_id)
    await wait_until(lambda: accepts(port), PORT_BOUND, what=f"TCP port {port} to open")

    assert await redis_cli(port, "SET", "k", "v") == "OK"
    assert await redis_cli(port, "GET", "k") == "v"

    await client.stop()
    await wait_until(lambda: refuses(port), PORT_BOUND, what=f"TCP port {port} to close")

    await client.start()
    await wait_until(lambda: accepts(port), PORT_BOUND, what=f"TCP port {port} to reopen")
    assert await redis_cli(port, "GET", "k") == "v"


async def test_many_concurrent_connections_are_carried_byte_for_byte(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    connections = 40
    size = 256 * 1024  # bytes each way per connection

    async def echo(stream: trio.SocketStream) -> None:
        async for chunk in stream:
            await stream.send_all(chunk)
        await stream.send_eof()

    async def round_trip(port: int, seed: int, received: dict[int, bytes]) -> None:
        data = random.Random(seed).randbytes(size)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream, trio.open_nursery() as nursery:

            async def send() -> None:
                await stream.send_all(data)
                await stream.send_eof()

            nursery.start_soon(send)
            echoed = bytearray()
            async for chunk in stream:
                echoed += chunk
        received[seed] = bytes(echoed)

    with trio.fail_after(60):
        async with trio.open_nursery() as backend:
            listeners = await backend.start(trio.serve_tcp, echo, 0)
            backend_port = listeners[0].socket.getsockname()[1]
            server = await server_factory(firstPort=free_port_block(), tcpAddr=LOOPBACK)
            client = await client_factory(server, backend_port)
            port = await registration_port(server, client.registration_id)
            await wait_until(lambda: accepts(port), PORT_BOUND, what=f"TCP port {port} to open")

            received: dict[int, bytes] = {}
            async with trio.open_nursery() as callers:
                for seed in range(connections):
                    callers.start_soon(round_trip, port, seed, received)
            backend.cancel_scope.cancel()

    assert sorted(received) == list(range(connections))
    for seed, echoed in received.items():
        assert echoed == random.Random(seed).randbytes(size), f"connection {seed} differs"


async def test_connections_past_the_per_address_limit_are_closed_at_once(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    """maxConnectionsPerAddress holds on the TCP ports as on HTTP: the next connection from
    the address is closed unanswered, the ones open keep working, and a closed one makes room."""

    async def echo(stream: trio.SocketStream) -> None:
        async for chunk in stream:
            await stream.send_all(chunk)

    async def echoes(stream: trio.SocketStream) -> bool:
        echoed = b""
        with contextlib.suppress(trio.BrokenResourceError):  # reset instead of closed
            await stream.send_all(b"ping")
            while len(echoed) < 4 and (chunk := await stream.receive_some()):
                echoed += chunk
        return echoed == b"ping"

    with trio.fail_after(30):
        async with trio.open_nursery() as backend:
            listeners = await backend.start(trio.serve_tcp, echo, 0)
            backend_port = listeners[0].socket.getsockname()[1]
            server = await server_factory(
                firstPort=free_port_block(), tcpAddr=LOOPBACK, maxConnectionsPerAddress=2
            )
            client = await client_factory(server, backend_port)
            port = await registration_port(server, client.registration_id)
            await wait_until(lambda: accepts(port), PORT_BOUND, what=f"TCP port {port} to open")

            held: list[trio.SocketStream] = []

            async def let_in() -> bool:
                """Whether a new connection was let in (then it is held). A connection the
                server is still closing (the probe above, one we closed) still counts."""
                stream = await trio.open_tcp_stream(LOOPBACK, port)
                if await echoes(stream):
                    held.append(stream)
                    return True
                await stream.aclose()
                return False

            for _ in range(2):
                await wait_until(let_in, 10, what="a connection to be let in")
            assert not await let_in()  # a third from the same address
            assert [await echoes(stream) for stream in held] == [True, True]
            await held.pop().aclose()
            await wait_until(let_in, 10, what="room for a new connection once one closed")
            for stream in held:
                assert await echoes(stream)
                await stream.aclose()
            backend.cancel_scope.cancel()


async def test_a_port_in_use_is_logged_and_the_tunnel_still_serves(
    server_factory: ServerFactory, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        server = await server_factory(firstPort=taken, tcpAddr=LOOPBACK)
        client = await client_factory(server, python_backend.port)
        assert await registration_port(server, client.registration_id) == taken

        def logged() -> bool:
            return (
                f"cannot listen on TCP 127.0.0.1:{taken}: already in use" in server.log.read_text()
            )

        await wait_until(logged, PORT_BOUND, what="the port-in-use error in the server log")
        errors = [r for r in log_records(server.log) if r["level"] == "ERROR"]
        assert len(errors) == 1, errors
        response = await http_request(server.http_port, client.host, timeout=10)
        assert response.status == 200

    # Freed: the port is tried again when the registration next comes online.
    await client.stop()
    await client.start()
    await wait_until(lambda: accepts(taken), PORT_BOUND, what=f"TCP port {taken} to open")


async def test_ports_follow_the_hub_and_report_a_port_in_use() -> None:
    """In process: attaching opens the port, detaching closes it at once; no polling."""
    free, taken = free_port(), socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = {"1001": free, "1002": taken.getsockname()[1]}
    hub = Hub()

    def registration_for(rid: str) -> Registration | None:
        return Registration(rid, b"\0" * 32, ports[rid], 0.0) if rid in ports else None

    tcp_ports = TcpPorts(hub, registration_for, host="127.0.0.1", open_timeout=5)
    with taken, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(tcp_ports.run, nursery)
            pair = await session_pair(nursery)
            attachment = Attachment(pair.server.session, [REGISTRATION_ID, "1002"], "test", {})
            assert not await accepts(free)

            hub.attach(attachment)
            await wait_until(lambda: accepts(free), PORT_BOUND, what="the port to open")
            assert tcp_ports.status_of("1001") == {"tcpListening": True, "tcpError": ""}
            assert tcp_ports.status_of("1002") == {
                "tcpListening": False,
                "tcpError": f"cannot listen on TCP 127.0.0.1:{ports['1002']}: already in use",
            }

            hub.detach(attachment)
            await wait_until(lambda: refuses(free), PORT_BOUND, what="the port to close")
            assert tcp_ports.status_of("1001") == {"tcpListening": False, "tcpError": ""}
            assert tcp_ports.status_of("1002") == {"tcpListening": False, "tcpError": ""}
            nursery.cancel_scope.cancel()
