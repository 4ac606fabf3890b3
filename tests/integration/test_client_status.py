"""What a running client tells about itself: ``start``, ``status [--json]`` and the loopback
status endpoint, with real processes."""

from __future__ import annotations

import json
import re
import socket

from tests.integration.harness import (
    ClientFactory,
    PetitClient,
    PetitServer,
    PythonBackend,
    curl,
    http_request,
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
        rf'Client has status "connected" on pid {client.pid}: server 127\.0\.0\.1:'
        rf"{server.tunnel_port}, connected since .+, up [\d.]+ s\.",
        human[0],
    ), human
    assert re.fullmatch(
        r"0 stream\(s\) in flight, \d+ bytes in, \d+ bytes out, 0 reconnect\(s\)\.", human[1]
    )
    assert human[2].startswith(f" + {rid} default connected -> 127.0.0.1:"), human
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
