"""A server with several worker processes (``workers = 2``) on a real redis-server: the
workers share the public ports, a client keeps a session to each, a killed worker comes
back, and stop (or the supervisor's death) ends them all."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme

from tests.integration.harness import (
    REDIS_SERVER,
    PetitClient,
    PetitServer,
    PythonBackend,
    Reaper,
    RedisServer,
    ServerFactory,
    edit_config,
    free_port,
    free_port_block,
    http_request,
    run_cli,
    tail,
    wait_until,
)

pytestmark = [
    pytest.mark.trio,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed"),
]

SETTLE = 30.0  # seconds for sessions, restarts and Redis to settle on a busy machine
WORKERS = 2


async def start_workers(
    server_factory: ServerFactory, redis: RedisServer, *, start: bool = True, **settings: object
) -> PetitServer:
    return await server_factory(start=start, **worker_settings(redis, WORKERS), **settings)


def worker_settings(redis: RedisServer, workers: int) -> dict[str, object]:
    """``workers`` on the Redis registry, with raw TCP ports of this test's own: tests run
    side by side, and another test's server on the same ports would have them first."""
    registry = {"backend": "redis", "url": redis.url, "prefix": "petit:"}
    return {"workers": workers, "registry": registry, "firstPort": free_port_block()}


async def connected_client(
    server: PetitServer, backend: PythonBackend, reaper: Reaper, directory: Path
) -> PetitClient:
    client = PetitClient(directory, server, reaper)
    await client.init(backend.port)
    await client.register()
    await client.start()
    await wait_until(
        lambda: _held_by_every_worker(server, client.registration_id),
        SETTLE,
        what="a session on every worker",
    )
    return client


@dataclass
class Served:
    """A server with workers, and a client holding a session to each."""

    server: PetitServer
    client: PetitClient


@pytest.fixture
async def served(
    server_factory: ServerFactory,
    redis_server: RedisServer,
    python_backend: PythonBackend,
    reaper: Reaper,
    tmp_path: Path,
) -> Served:
    server = await start_workers(server_factory, redis_server)
    return Served(server, await connected_client(server, python_backend, reaper, tmp_path / "c"))


async def _held_by_every_worker(server: PetitServer, registration_id: str) -> bool:
    status = await server.control("STATUS")
    workers = status.get("workers")
    running = isinstance(workers, list) and all(w["state"] == "running" for w in workers)
    return running and _registration(status, registration_id).get("connectedWorkers") == WORKERS


def _registration(status: dict[str, object], registration_id: str) -> dict[str, object]:
    connections = status.get("connections")
    assert isinstance(connections, list), status
    return next((c for c in connections if c["registeredId"] == registration_id), {})


def _workers(status: dict[str, object]) -> list[dict[str, object]]:
    workers = status.get("workers")
    assert isinstance(workers, list), status
    return workers


def _alive(pid: object) -> bool:
    assert isinstance(pid, int)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_workers_share_the_ports_and_serve_from_their_own_sessions(served: Served) -> None:
    server, client = served.server, served.client
    client_status = await client.control_status()
    servers = client_status["servers"]
    assert isinstance(servers, list)
    assert sorted(s.get("worker") for s in servers) == [0, 1], servers

    # Keep-alive connections held open at once: the kernel spreads them over both workers.
    async with trio.open_nursery() as nursery:
        opened = trio.Semaphore(0)
        release = trio.Event()

        async def caller(number: int) -> None:
            body = f"call {number}".encode()
            stream = await trio.open_tcp_stream("127.0.0.1", server.http_port)
            async with stream:
                request = (
                    f"POST /echo HTTP/1.1\r\nHost: {client.host}\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode()
                await stream.send_all(request + body)
                answer = b""
                while body not in answer:
                    chunk = await stream.receive_some(65536)
                    assert chunk, answer
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 200"), answer
                opened.release()
                await release.wait()

        with trio.fail_after(SETTLE):
            for number in range(16):
                nursery.start_soon(caller, number)
            for _ in range(16):
                await opened.acquire()
            status = await server.control("STATUS")
            release.set()
    per_worker = [w.get("publicConnections") for w in _workers(status)]
    assert all(isinstance(n, int) and n > 0 for n in per_worker), per_worker
    assert status["publicConnections"] == 16, status
    port = _registration(status, client.registration_id)["port"]
    assert isinstance(port, int)
    for _ in range(8):  # its raw TCP port: bound by both workers, like the HTTP port
        response = await http_request(port, client.host, "POST", "/echo", b"raw")
        assert (response.status, response.body) == (200, b"raw"), response

    pids = [w["pid"] for w in _workers(status)]
    await server.stop()
    assert not any(_alive(pid) for pid in pids), pids
    for index in range(WORKERS):
        assert f"worker {index}" in server.log.read_text()


async def test_https_and_the_admin_api_with_workers(
    server_factory: ServerFactory,
    redis_server: RedisServer,
    python_backend: PythonBackend,
    reaper: Reaper,
    tmp_path: Path,
) -> None:
    """Every worker serves the HTTPS port with the configured certificate; worker 0 serves
    the admin API, at the port the supervisor's pid file names."""
    authority = trustme.CA()
    leaf = authority.issue_cert("*.example.test")
    certificate, key, root = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "root.pem"
    certificate.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    root.write_bytes(authority.cert_pem.bytes())
    server = await start_workers(
        server_factory,
        redis_server,
        secureProxyPort=0,
        httpsCertificate=str(certificate),
        httpsKey=str(key),
    )
    client = await connected_client(server, python_backend, reaper, tmp_path / "client")
    host, port = f"{client.registration_id}.example.test", server.ports["https"]
    for _ in range(8):  # a new connection each: both workers' sockets get some
        result = await run_cli(
            [
                "curl",
                "--silent",
                "--show-error",
                "--cacert",
                str(root),
                "--resolve",
                f"{host}:{port}:127.0.0.1",
                "--data",
                "sealed",
                f"https://{host}:{port}/echo",
            ],
            check=False,
            timeout=30,
        )
        assert (result.returncode, result.stdout) == (0, "sealed"), result

    assert (await server.admin("/ping")).status == 200
    registry = json.loads((await server.admin("/registry")).body)
    assert [c["registeredId"] for c in registry["connections"]] == [client.registration_id]


async def test_a_killed_worker_comes_back_with_its_sessions(served: Served) -> None:
    server, client = served.server, served.client
    before = _workers(await server.control("STATUS"))[1]
    os.kill(int(str(before["pid"])), signal.SIGKILL)

    async def back() -> bool:
        worker = _workers(await server.control("STATUS"))[1]
        return worker["state"] == "running" and worker["pid"] != before["pid"]

    await wait_until(back, SETTLE, what=f"worker 1 to be started again\n{tail(server.log)}")
    after = _workers(await server.control("STATUS"))[1]
    assert after["restarts"] == 1, after
    assert "SIGKILL" in str(after["lastError"]), after
    await wait_until(
        lambda: _held_by_every_worker(server, client.registration_id),
        SETTLE,
        what="the client's session to the new worker 1",
    )
    for _ in range(8):  # new connections, whichever worker each lands on
        response = await http_request(server.http_port, client.host, "POST", "/echo", b"hi")
        assert response.status == 200, response


async def test_workers_end_with_their_supervisor(
    server_factory: ServerFactory, redis_server: RedisServer
) -> None:
    server = await start_workers(server_factory, redis_server)
    pids = [w["pid"] for w in _workers(await server.control("STATUS"))]
    assert all(_alive(pid) for pid in pids), pids
    os.kill(server.pid, signal.SIGKILL)  # the supervisor only: no stop, no drain
    await wait_until(
        lambda: not any(_alive(pid) for pid in pids), SETTLE, what="the workers to end"
    )


async def test_a_worker_that_cannot_start_fails_the_start_with_its_reason(
    server_factory: ServerFactory, redis_server: RedisServer
) -> None:
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        server = await start_workers(server_factory, redis_server, start=False, adminPort=port)
        result = await server.cli("start", check=False)
    assert result.returncode == 5, result
    assert result.stderr.strip().splitlines() == [
        f"error: worker 0 did not start: cannot listen for the admin API on 127.0.0.1:{port}: "
        "Address already in use; stop what uses the port or change adminPort"
    ], result
    assert server.running() is None


async def test_workers_need_the_redis_registry(server_factory: ServerFactory) -> None:
    server = await server_factory(start=False, workers=2)
    result = await server.cli("start", check=False)
    assert result.returncode == 3, result
    assert result.stderr.strip() == (
        "error: server.workers: 2 workers share their registrations through Redis: set "
        '[server.registry] backend = "redis" (scripts/bootstrap redis), or workers = 1'
    ), result


async def test_the_client_follows_the_worker_count_across_restarts(
    server_factory: ServerFactory,
    redis_server: RedisServer,
    python_backend: PythonBackend,
    reaper: Reaper,
    tmp_path: Path,
) -> None:
    """One process, then two workers, then one again, on the same port: the client holds a
    session per worker each time, and no more (none left dialling for a worker gone)."""
    settings = worker_settings(redis_server, 1)
    server = await server_factory(start=True, **settings, backPort=free_port())
    client = PetitClient(tmp_path / "client", server, reaper)
    await client.init(python_backend.port)
    await client.register()
    await client.start()

    async def sessions(expected: list[int]) -> None:
        async def held() -> bool:
            servers = (await client.control_status())["servers"]
            assert isinstance(servers, list)
            connected = [s for s in servers if s["status"] == "connected"]
            workers = sorted(int(s.get("worker", -1)) for s in servers)
            return len(servers) == len(connected) and workers == expected

        await wait_until(held, SETTLE, what=f"client sessions to workers {expected}")

    await sessions([-1])  # no workers: one session, without an index
    for workers, expected in ((2, [0, 1]), (1, [-1])):
        await server.stop()
        edit_config(server.config, "server", workers=workers)
        await server.start()
        await sessions(expected)
        response = await http_request(server.http_port, client.host, "POST", "/echo", b"on")
        assert response.status == 200, response
