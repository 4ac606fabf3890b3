"""The whole user flow through the real CLIs, real daemons, curl, nc and nginx."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest

from tests.integration.harness import (
    PETIT_CLIENT,
    PETIT_SERVER,
    UNAVAILABLE,
    ClientFactory,
    NginxBackend,
    PetitServer,
    PythonBackend,
    ServerFactory,
    curl,
    curl_url,
    free_port,
    run_cli,
    tail,
    wait_exit,
    wait_pid_file,
)

pytestmark = pytest.mark.integration


async def test_setup_through_the_clis(
    server: PetitServer, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    assert "Created configuration file" in server.outputs["init"].stdout
    assert server.ca.exists()
    registry_before = server.registry.read_text()
    assert f"Server started with pid {server.pid}." in server.outputs["start"].stdout

    client = await client_factory(server, python_backend.port)
    registered = client.outputs["register"].stdout
    assert f"Registered with ID {client.registration_id} " in registered
    assert client.registration_id == "1001"  # IDs start at 1001
    assert "Public URL: http://1001.localhost" in registered
    assert '"1001"' not in registry_before
    assert '"1001"' in server.registry.read_text()  # the server recorded the registration
    assert f"Client started on pid {client.pid}." in client.outputs["start"].stdout

    status = await client.status()
    assert status["status"] == "connected"
    assert status["pid"] == client.pid
    server_status = json.loads(
        (await server.cli("status", "--json", client.registration_id)).stdout
    )
    assert server_status["connections"][0]["registeredId"] == "1001"
    assert server_status["connections"][0]["connected"] is True


async def test_static_files_from_nginx_through_the_tunnel(
    server: PetitServer,
    client_factory: ClientFactory,
    nginx_backend: NginxBackend,
    tmp_path: Path,
) -> None:
    client = await client_factory(server, nginx_backend.port)
    port, host = server.http_port, client.host

    for name in ("small.bin", "large.bin"):
        out = tmp_path / f"got-{name}"
        result = await curl("-o", str(out), "-w", "%{http_code}", *curl_url(port, host, f"/{name}"))
        assert result.stdout == "200", result
        expected = (nginx_backend.www / name).read_bytes()
        assert len(expected) in (1024, 10 * 1024 * 1024)
        assert out.read_bytes() == expected, f"{name} differs from the file on disk"

    head = await curl("-I", *curl_url(port, host, "/large.bin"))
    lines = head.stdout.lower().splitlines()
    assert lines[0].startswith("http/1.1 200"), head
    assert "content-length: 10485760" in [line.strip() for line in lines], head

    # Two requests on one public connection: curl reuses it.
    two = await curl(
        "-v", "-o", "/dev/null", "-o", "/dev/null", "-w", "%{http_code}\n",
        *curl_url(port, host, "/small.bin"),
        f"http://{host}:{port}/index.html",
    )  # fmt: skip
    assert two.stdout.split() == ["200", "200"], two
    assert "Re-using existing connection" in two.stderr, two.stderr
    assert two.stderr.count("Connected to") == 1, two.stderr


async def test_post_chunked_and_keepalive_with_python_backend(
    server: PetitServer,
    client_factory: ClientFactory,
    python_backend: PythonBackend,
    tmp_path: Path,
) -> None:
    client = await client_factory(server, python_backend.port)
    port, host = server.http_port, client.host

    body = tmp_path / "body.bin"
    body.write_bytes(random.Random(5).randbytes(5 * 1024 * 1024))
    echoed = tmp_path / "echoed.bin"
    result = await curl(
        "--data-binary", f"@{body}", "-H", "Content-Type: application/octet-stream",
        "-o", str(echoed), "-w", "%{http_code}", *curl_url(port, host, "/echo"),
    )  # fmt: skip
    assert result.stdout == "200", result
    assert echoed.read_bytes() == body.read_bytes(), "the echoed 5 MiB body differs"

    headers = tmp_path / "chunked.headers"
    chunked = tmp_path / "chunked.out"
    result = await curl("-D", str(headers), "-o", str(chunked), *curl_url(port, host, "/chunked"))
    assert chunked.read_bytes() == PythonBackend.CHUNKED_BODY
    head = headers.read_text().lower()
    assert head.startswith("http/1.1 200"), head
    assert "transfer-encoding: chunked" in head, head

    two = await curl("-v", *curl_url(port, host, "/"), f"http://{host}:{port}/again")
    assert two.stdout == PythonBackend.GET_BODY.decode() * 2, two
    assert "Re-using existing connection" in two.stderr, two.stderr


async def test_unknown_offline_and_unreachable_answers(
    server: PetitServer, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    port = server.http_port

    async def answer(host: str) -> tuple[str, str]:
        result = await curl("-w", "\n%{http_code}", *curl_url(port, host, "/"))
        body, _, status = result.stdout.rpartition("\n")
        return status, body

    online = await client_factory(server, python_backend.port)
    assert await answer(online.host) == ("200", PythonBackend.GET_BODY.decode())

    assert await answer("4242.localhost") == ("404", UNAVAILABLE.decode())
    assert await answer("nothing.localhost") == ("404", UNAVAILABLE.decode())

    stopped = await client_factory(server, python_backend.port)
    assert await answer(stopped.host) == ("200", PythonBackend.GET_BODY.decode())
    await stopped.stop()
    assert await answer(stopped.host) == ("503", UNAVAILABLE.decode())

    target_down = await client_factory(server, free_port())  # nothing listens there
    assert await answer(target_down.host) == ("502", UNAVAILABLE.decode())

    assert await answer(online.host) == ("200", PythonBackend.GET_BODY.decode())


async def stop_with(how: str, child_pid: int, control_port: int) -> None:
    if how == "STOP":
        reply = await run_cli(["nc", "-N", "127.0.0.1", str(control_port)], stdin=b"STOP\x03")
        assert json.loads(reply.stdout)["success"] is True, reply
    else:
        os.kill(child_pid, signal.Signals[how])


@pytest.mark.parametrize("how", ["STOP", "SIGINT", "SIGTERM"])
async def test_server_stops_cleanly(
    how: str,
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    python_backend: PythonBackend,
    tmp_path: Path,
) -> None:
    server = await server_factory(start=False)
    log = tmp_path / "server-foreground.log"
    child = server.spawn_foreground(log)
    server.adopt(await wait_pid_file(server.directory, "server", child, log))
    # start --foreground exec'd the daemon: the pid it was started as, under the app's name
    assert Path(f"/proc/{child.pid}/comm").read_text() == "petit-server\n"
    client = await client_factory(server, python_backend.port)  # a registration to keep
    registry = json.loads(server.registry.read_text())
    assert client.registration_id in json.dumps(registry)

    await stop_with(how, child.pid, server.control_port)

    assert await wait_exit(child) == 0, tail(log)
    assert not (server.directory / "server.lock").exists()
    assert not (server.directory / "server.pid").exists()
    assert json.loads(server.registry.read_text()) == registry
    assert client.running() is not None, "the client must outlive its server (and reconnect)"


@pytest.mark.parametrize("how", ["STOP", "SIGINT", "SIGTERM"])
async def test_client_stops_cleanly(
    how: str,
    server: PetitServer,
    client_factory: ClientFactory,
    python_backend: PythonBackend,
    tmp_path: Path,
) -> None:
    client = await client_factory(server, python_backend.port, start=False)
    log = tmp_path / "client-foreground.log"
    child = client.spawn_foreground(log)
    client.adopt(await wait_pid_file(client.directory, "client", child, log))
    assert Path(f"/proc/{child.pid}/comm").read_text() == "petit-client\n"
    await client.wait_connected()
    online = await curl(
        "-w", "%{http_code}", "-o", "/dev/null", *curl_url(server.http_port, client.host, "/")
    )
    assert online.stdout == "200"

    await stop_with(how, child.pid, client.control_port)

    assert await wait_exit(child) == 0, tail(log)
    assert not (client.directory / "client.lock").exists()
    assert not (client.directory / "client.pid").exists()
    offline = await curl(
        "-w", "%{http_code}", "-o", "/dev/null", *curl_url(server.http_port, client.host, "/")
    )
    assert offline.stdout == "503"


@pytest.mark.parametrize("foreground", [False, True])
async def test_start_while_running_is_refused(
    foreground: bool,
    server: PetitServer,
    client_factory: ClientFactory,
    python_backend: PythonBackend,
) -> None:
    client = await client_factory(server, python_backend.port)
    extra = ["--foreground"] if foreground else []
    for program, config, pid in (
        (PETIT_SERVER, server.config, server.pid),
        (PETIT_CLIENT, client.config, client.pid),
    ):
        again = await run_cli([program, "start", *extra, "-c", config], check=False)
        assert again.returncode != 0, again
        assert "already running" in again.stderr, again
        assert str(pid) in again.stderr, again
        assert "Traceback" not in again.stderr, again
    # Both still run and serve.
    assert server.running() is not None
    assert client.running() is not None
    assert (await client.status())["status"] == "connected"
