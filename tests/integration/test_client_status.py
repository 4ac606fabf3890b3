"""What a running client tells about itself: ``start``, ``status [--json]`` and the loopback
status endpoint, with real processes."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import socket
import subprocess
import time
from pathlib import Path

import trio

from tests.integration.harness import (
    CLI_TIMEOUT,
    PETIT_CLIENT,
    READY_TIMEOUT,
    ClientFactory,
    PetitClient,
    PetitServer,
    PythonBackend,
    Reaper,
    ServerFactory,
    curl,
    edit_config,
    free_port,
    http_request,
    wait_until,
)


def status_port(client: PetitClient) -> int:
    info = client.running()
    assert info is not None
    ports = info.extra["ports"]
    assert isinstance(ports, dict), info
    return int(ports["status"])


async def test_status_endpoint_and_command_show_the_clients_side(
    server: PetitServer, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    client = await client_factory(server, python_backend.port)
    rid = client.registration_id
    started = client.outputs["start"].stdout
    assert f"Tunnel up to 127.0.0.1:{server.tunnel_port} for {rid}.\n" in started, started

    response = await http_request(server.http_port, client.host, "POST", "/echo", b"x" * 1000)
    assert response.status == 200
    port = status_port(client)
    fetched = await curl(f"http://127.0.0.1:{port}/status")
    document = json.loads(fetched.stdout)
    assert document["pid"] == client.pid
    assert (document["status"], document["server"]) == (
        "connected",
        f"127.0.0.1:{server.tunnel_port}",
    )
    assert (document["reconnects"], document["lastError"]) == (0, "")
    assert isinstance(document["connectedSince"], float)
    (registration,) = document["registration"]
    assert (registration["id"], registration["state"]) == (rid, "connected")
    assert registration["bytesIn"] >= 1000, registration
    assert registration["bytesOut"] > 0, registration
    assert document["bytesIn"] == registration["bytesIn"]

    from_cli = json.loads((await client.cli("status", "--json")).stdout)
    assert set(from_cli) == set(document)
    assert from_cli["registration"][0]["bytesIn"] == registration["bytesIn"]

    human = (await client.cli("status")).stdout.splitlines()
    assert re.fullmatch(
        rf'Client has status "connected" on pid {client.pid}, up [\d.]+ s\.', human[0]
    ), human
    assert re.fullmatch(
        rf"Server 127\.0\.0\.1:{server.tunnel_port}: connected since \d{{4}}-.+", human[1]
    ), human
    assert re.fullmatch(
        r"0 stream\(s\) in flight, \d+ bytes in, \d+ bytes out, 0 reconnect\(s\)\.", human[2]
    )
    assert human[3].startswith(f" + {rid} default connected -> 127.0.0.1:"), human
    assert human[-1] == f"As JSON: curl http://127.0.0.1:{port}/status"

    # Loopback only, GET only, one path; a rebound DNS name is not served.
    assert (await http_request(port, "127.0.0.1", target="/nope")).status == 404
    assert (await http_request(port, "127.0.0.1", "POST", "/status", b"{}")).status == 405
    assert (await http_request(port, "evil.example", target="/status")).status == 403
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.2", port)) != 0  # bound to 127.0.0.1 alone


async def test_start_says_when_the_tunnel_is_not_up(
    server: PetitServer, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    client = await client_factory(server, python_backend.port, start=False)
    await server.stop()
    result = await client.cli("start")
    client.reaper.track_daemon(int(re.findall(r"pid (\d+)", result.stdout)[0]))
    assert result.returncode == 0, result
    assert re.fullmatch(
        r"warning: the tunnel is not up yet \(.+\); the client keeps trying "
        rf"\(petit-client status -c {client.config}\)\n",
        result.stderr,
    ), result
    await client.stop()


def run_on_terminal(argv: list[str]) -> tuple[int, str, str]:
    """Run a command with stderr on a pseudo-terminal: (exit status, stdout, terminal).

    The terminal is read while the command runs, so a chatty one never blocks on it.
    """
    controller, terminal = pty.openpty()
    deadline = time.monotonic() + CLI_TIMEOUT
    output = b""
    try:
        with subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal
        ) as child:
            os.close(terminal)
            while select.select([controller], [], [], max(0, deadline - time.monotonic()))[0]:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: the command closed the terminal
                    break
                output += chunk
            assert child.stdout is not None
            stdout = child.stdout.read()
            returncode = child.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        os.close(controller)
    return returncode, stdout.decode(), output.decode(errors="replace")


async def test_long_steps_show_progress_on_a_terminal_only(
    server: PetitServer, python_backend: PythonBackend, reaper: Reaper, tmp_path: Path
) -> None:
    client = PetitClient(tmp_path / "client", server, reaper)
    await client.init(python_backend.port)
    base = [str(PETIT_CLIENT), "-c", str(client.config)]

    status, stdout, terminal = await trio.to_thread.run_sync(
        run_on_terminal, [base[0], "register", *base[1:]]
    )
    assert status == 0, terminal
    assert f"\r- Registering with 127.0.0.1:{server.tunnel_port} ... 0s" in terminal, terminal
    assert terminal.endswith("\r\x1b[K"), terminal  # the spinner line is erased at the end
    client.registration_id = re.findall(r"Registered with ID (\d+)", stdout)[0]

    status, stdout, terminal = await trio.to_thread.run_sync(
        run_on_terminal, [base[0], "start", *base[1:]]
    )
    assert status == 0, terminal
    reaper.track_daemon(int(re.findall(r"pid (\d+)", stdout)[0]))
    assert f"Waiting for the tunnel to 127.0.0.1:{server.tunnel_port} ... 0s" in terminal
    await client.stop()

    piped = await client.cli("unregister", "-a")  # stderr is a pipe here: no spinner
    assert "\r" not in piped.stderr, piped


async def test_start_names_the_server_it_reached_among_several(
    server: PetitServer, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    """With servers = [a dead one, the live one], start said "Tunnel up to" the first
    configured server; it names the one the tunnel reached (and waits for either)."""
    client = await client_factory(server, python_backend.port, start=False)
    nowhere = f"127.0.0.1:{free_port()}"
    live = f"127.0.0.1:{server.tunnel_port}"
    edit_config(client.config, "client", servers=[nowhere, live], serverSessions=1)
    await client.start()
    started = client.outputs["start"].stdout
    assert f"Tunnel up to {live} for {client.registration_id}.\n" in started, started
    lines = (await client.cli("status")).stdout.splitlines()
    servers = [line for line in lines if line.startswith("Server ")]
    assert servers[0] == f"Server {nowhere}: standby (serverSessions = 1)", servers
    assert servers[1].startswith(f"Server {live}: connected since "), servers


async def test_status_lists_every_server_with_its_own_session(
    server: PetitServer, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    """Two servers, a session to each (serverSessions 0): the live one is connected, the
    dead one says why not; the text names both, not only the one reached."""
    client = await client_factory(server, python_backend.port, start=False)
    nowhere = f"127.0.0.1:{free_port()}"
    live = f"127.0.0.1:{server.tunnel_port}"
    edit_config(client.config, "client", servers=[live, nowhere])
    await client.start()

    async def both_tried() -> bool:
        sessions = (await client.control_status())["servers"]
        assert isinstance(sessions, list), sessions
        up = [s["server"] for s in sessions if s["status"] == "connected"]
        failed = [s["server"] for s in sessions if s["lastError"]]
        return (up, failed) == ([live], [nowhere])

    await wait_until(both_tried, READY_TIMEOUT, what="a session up and one failed")
    lines = (await client.cli("status")).stdout.splitlines()
    assert lines[0].startswith(f'Client has status "connected" on pid {client.pid}, up '), lines
    assert re.fullmatch(rf"Server {live}: connected since \d{{4}}-\d\d-\d\d [\d:]+", lines[1])
    assert re.fullmatch(
        rf"Server {nowhere}: (connecting|disconnected), last error: cannot reach the server "
        rf"at {nowhere}: .+",
        lines[2],
    ), lines


async def loopback_check(client: PetitClient) -> dict[str, object] | None:
    document = json.loads((await client.cli("status", "--json")).stdout)
    check = document["registration"][0]["loopback"]
    assert check is None or isinstance(check, dict), document
    return check


async def test_the_client_checks_its_public_url_through_the_server(
    server_factory: ServerFactory, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    """Every loopbackInterval the client asks GET <endpoint>/-g2c-intercept, the way a
    visitor would, and answers it itself down its own tunnel: ok even with the private
    service down. A public URL that leads nowhere shows as a failure, in status and the log."""
    port = free_port()
    endpoint = f"http://REGID.localhost:{port}"
    server = await server_factory(proxyPort=port, vitae={"endpoint": endpoint})
    client = await client_factory(server, python_backend.port, start=False)
    edit_config(client.config, "client", loopbackInterval=0.2)
    await client.start()
    python_backend.close()  # the check never reaches the private service
    await wait_until(lambda: _checked(client), 10, what="a loopback check")
    check = await loopback_check(client)
    assert check is not None
    url = f"http://{client.registration_id}.localhost:{port}/-g2c-intercept"
    assert (check["url"], check["ok"], check["error"]) == (url, True, "")
    human = (await client.cli("status")).stdout
    assert re.search(r"\n     loopback check at \d{4}-.+: ok\n", human), human

    dead = free_port()
    elsewhere = await server_factory(vitae={"endpoint": f"http://REGID.localhost:{dead}"})
    lost = await client_factory(elsewhere, python_backend.port, start=False)
    edit_config(lost.config, "client", loopbackInterval=0.2)
    await lost.start()
    await wait_until(lambda: _checked(lost), 10, what="a loopback check")
    failed = await loopback_check(lost)
    assert failed is not None
    assert failed["ok"] is False
    assert str(failed["error"]).startswith(f"all attempts to connect to 127.0.0.1:{dead} failed")
    assert f"loopback check of http://{lost.registration_id}.localhost:{dead}" in (
        lost.log.read_text()
    )


async def _checked(client: PetitClient) -> bool:
    return await loopback_check(client) is not None
