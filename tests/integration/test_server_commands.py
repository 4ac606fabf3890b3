"""``petit-server`` commands through the real CLI: aliases, enrollment tokens, status,
registrations, config, and the server side of ``petit-client unregister``.

Alias and token commands work with the server running (control port) and stopped (the
registry file, under the server's lock); both paths are exercised.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import tomli_w
import trio

from petit.transport import UNREGISTER_PATH
from petit_server.registry.base import ENROLLMENT_REFUSED
from tests.integration.harness import (
    CLI_TIMEOUT,
    PETIT_SERVER,
    UNAVAILABLE,
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
    registry_entry,
    run_cli,
    signed_request,
    unregister_request,
    wait_until,
)

pytestmark = pytest.mark.integration


async def curl_host(server: PetitServer, host: str) -> tuple[str, bytes]:
    """``curl -H 'Host: HOST' http://127.0.0.1:PORT/`` → (status, body)."""
    result = await curl(
        "-H", f"Host: {host}", "-w", "\n%{http_code}", f"http://127.0.0.1:{server.http_port}/"
    )
    body, _, status = result.stdout.rpartition("\n")
    return status, body.encode()


def table(output: str) -> list[list[str]]:
    """The rows of a printed table (columns are two or more spaces apart), header dropped."""
    lines = [line for line in output.splitlines() if line and not line.startswith("(")]
    return [re.split(r"\s{2,}", line) for line in lines[1:]]


def aliases_in_file(server: PetitServer, registration_id: str) -> object:
    entry = registry_entry(server, registration_id)
    assert entry is not None, registration_id
    return entry["aliases"]


def lock_files(server: PetitServer) -> list[str]:
    return sorted(p.name for p in server.directory.iterdir() if p.suffix in (".lock", ".pid"))


async def test_aliases_route_like_ids_with_the_server_up_or_down(
    server_factory: ServerFactory, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    # A fixed tunnel port, so the client finds the server again after its restart.
    server = await server_factory(backPort=free_port())
    client = await client_factory(server, python_backend.port, start=False)
    rid = client.registration_id
    await server.stop()

    # Stopped: the CLI edits the registry file itself, under the server's lock.
    added = await server.cli("addalias", "MyAlias.Example.com", rid)
    assert added.stdout == "Alias added.\n"
    assert aliases_in_file(server, rid) == ["myalias.example.com"]
    assert lock_files(server) == []
    unknown = await server.cli("addalias", "other.example.com", "4242", check=False)
    assert (unknown.returncode, unknown.stderr) == (
        1,
        "error: Alias not added: No such registeredId 4242.\n",
    )

    await server.start()
    await client.start()
    for host in ("myalias.example.com", "MYALIAS.example.com:8090", f"{rid}.localhost"):
        assert await curl_host(server, host) == ("200", PythonBackend.GET_BODY), host

    # Running: through the control port, effective at once and saved.
    assert (await server.cli("addalias", "second.example.com", rid)).stdout == "Alias added.\n"
    assert await curl_host(server, "second.example.com") == ("200", PythonBackend.GET_BODY)
    taken = await server.cli("addalias", "second.example.com", rid, check=False)
    assert (taken.returncode, taken.stderr) == (
        1,
        "error: Alias not added: Alias second.example.com already exists.\n",
    )
    assert "      = myalias.example.com\n" in (await server.cli("status", rid)).stdout
    removed = await server.cli("removealias", "myalias.example.com")
    assert removed.stdout == "Alias deleted.\n"
    assert await curl_host(server, "myalias.example.com") == ("404", UNAVAILABLE)
    again = await server.cli("removealias", "myalias.example.com", check=False)
    assert (again.returncode, again.stderr) == (
        1,
        "error: Alias not deleted: myalias.example.com is not an alias.\n",
    )
    assert aliases_in_file(server, rid) == ["second.example.com"]

    await server.stop()
    assert (await server.cli("removealias", "second.example.com")).stdout == "Alias deleted.\n"
    assert aliases_in_file(server, rid) == []


async def register_with_token(client: PetitClient, token: str) -> None:
    result = await client.cli("register", "--token", token)
    match = re.search(r"Registered with ID (\d+)", result.stdout)
    assert match, result
    client.registration_id = match[1]


async def test_enrollment_tokens_with_the_server_up_or_down(
    server_factory: ServerFactory, tmp_path: Path, reaper: Reaper, python_backend: PythonBackend
) -> None:
    server = await server_factory(start=False, requireToken=True)
    created = await server.cli("token", "create", "--note", "first laptop")
    first = created.stdout.strip()
    assert re.fullmatch(r"pt_[A-Za-z0-9_-]{32}", first), created
    assert "shown only once" in created.stderr
    assert lock_files(server) == []

    await server.start()
    second = (await server.cli("token", "create")).stdout.strip()
    assert second.startswith("pt_")
    assert second != first
    listed = (await server.cli("token", "list")).stdout
    assert [row[:2] + row[3:] for row in table(listed)] == [
        ["1", "first laptop", "unused", "-"],
        ["2", "-", "unused", "-"],
    ]
    for secret in (first, second):
        assert secret not in listed
        assert secret not in server.registry.read_text()

    client = PetitClient(tmp_path / "client", server, reaper)
    await client.init(python_backend.port)
    await register_with_token(client, first)
    await client.start()
    reused = await client.cli("register", "-t", "second", "--token", first, check=False)
    assert reused.returncode != 0
    assert ENROLLMENT_REFUSED in reused.stderr

    listed = (await server.cli("token", "list")).stdout
    assert [row[3:] for row in table(listed)] == [["used", client.registration_id], ["unused", "-"]]
    used = await server.cli("token", "revoke", "1", check=False)
    assert (used.returncode, used.stderr) == (
        1,
        "error: Token not revoked: Token 1 is already used.\n",
    )
    assert (await server.cli("token", "revoke", "2")).stdout == "Token 2 revoked.\n"

    await server.stop()
    assert [row[3] for row in table((await server.cli("token", "list")).stdout)] == [
        "used",
        "revoked",
    ]
    unknown = await server.cli("token", "revoke", "7", check=False)
    assert (unknown.returncode, unknown.stderr) == (
        1,
        "error: Token not revoked: No such token 7.\n",
    )
    assert lock_files(server) == []


async def test_status_registrations_and_config(
    server: PetitServer, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    online = await client_factory(server, python_backend.port)
    offline = await client_factory(server, python_backend.port, start=False)
    await server.cli("addalias", "web.example.com", online.registration_id)
    port_of = {rid: (registry_entry(server, rid) or {})["port"] for rid in ("1001", "1002")}

    overview = (await server.cli("status")).stdout.splitlines()
    assert overview[0] == f'Server has status "running" on pid {server.pid}.'
    assert overview[1].startswith(f" + {online.registration_id} {port_of['1001']} sha256:")
    assert overview[2].startswith(f" - {offline.registration_id} {port_of['1002']} sha256:")
    detail = (await server.cli("status", online.registration_id)).stdout
    assert re.search(r'^      "[^"]+" @ 127\.0\.0\.1 since \d{4}-', detail, re.MULTILINE), detail
    assert "      = web.example.com" in detail
    as_json = json.loads((await server.cli("status", "--json")).stdout)
    assert [(c["registeredId"], c["connected"]) for c in as_json["connections"]] == [
        ("1001", True),
        ("1002", False),
    ]

    # The original server crashed on STATUS for an unknown ID.
    unknown = await server.cli("status", "4242", check=False)
    assert (unknown.returncode, unknown.stderr) == (1, "error: No such registeredId 4242.\n")
    assert await server.control("STATUS 4242") == {
        "success": False,
        "error": "No such registeredId 4242.",
    }
    assert (await server.control("PING"))["success"] is True

    rows = table((await server.cli("registrations")).stdout)
    assert [[r[0], r[1], r[3], r[4], r[6]] for r in rows] == [
        ["1001", str(port_of["1001"]), "web.example.com", "yes", "127.0.0.1"],
        ["1002", str(port_of["1002"]), "-", "no", "-"],
    ]
    assert rows[0][2].startswith("sha256:")

    await server.stop()
    stopped = (await server.cli("registrations")).stdout
    assert [r[4] for r in table(stopped)] == ["no", "no"]
    assert stopped.endswith("(the server is not running)\n")

    edit_config(server.config, "server", httpsPkcs12Password="hunter2-secret")
    shown = (await server.cli("config")).stdout
    assert shown.startswith(f"Verified configuration file at {server.config}.\n")
    assert "hunter2" not in shown
    assert '"httpsPkcs12Password": "********"' in shown
    assert '"requireToken": false' in shown
    document = json.loads(shown[shown.index("{") : shown.rindex("}") + 1])
    assert document["registry"] == {"backend": "file", "url": "********", "prefix": "petit:"}
    assert "registryBackend" not in document
    assert "2 registration(s), 0 enrollment token(s)" in shown
    assert "      a.k.a. web.example.com" in shown


async def test_unregistered_id_stops_routing_at_once(
    server: PetitServer, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    client = await client_factory(server, python_backend.port)
    other = await client_factory(server, python_backend.port)
    rid = client.registration_id
    await server.cli("addalias", "gone.example.com", rid)
    assert await curl_host(server, "gone.example.com") == ("200", PythonBackend.GET_BODY)

    result = await client.cli("unregister", "-r", rid)
    assert "Unregistered tenant" in result.stdout
    assert registry_entry(server, rid) is None
    for host in (f"{rid}.localhost", "gone.example.com"):
        assert await curl_host(server, host) == ("404", UNAVAILABLE), host
    status = json.loads((await server.cli("status", "--json")).stdout)
    assert [c["registeredId"] for c in status["connections"]] == [other.registration_id]
    # The alias went with the registration: another one may take it.
    await server.cli("addalias", "gone.example.com", other.registration_id)
    assert await curl_host(server, "gone.example.com") == ("200", PythonBackend.GET_BODY)

    # Unregistered behind its running client's back: its session, serving nothing else now,
    # is told to go away at once rather than lingering as "connected".
    since = (await other.control_status())["connectedSince"]
    request = unregister_request(other.key(), other.registration_id)
    reply = await signed_request(server, UNREGISTER_PATH, request)
    assert reply == {"type": "unregistered", "id": other.registration_id}
    assert await curl_host(server, "gone.example.com") == ("404", UNAVAILABLE)

    async def session_ended() -> bool:
        status = await other.control_status()
        return status["status"] != "connected" or status["connectedSince"] != since

    await wait_until(session_ended, 5, what="the unregistered client's session to end")
    assert (await other.control_status())["status"] != "connected"


async def test_a_started_server_removes_the_temporaries_a_killed_one_left(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(start=False)
    stale = server.registry.with_name(f".{server.registry.name}.0123456789abcdef.tmp")
    stale.write_text('{"half a regis')
    await server.start()
    assert not stale.exists()
    assert json.loads(server.registry.read_text())["version"] == 1
    for log in (server.directory / "logs").iterdir():  # logs name callers and IDs: owner only
        assert log.stat().st_mode & 0o777 == 0o600, log


async def test_start_works_from_a_directory_holding_a_petit_folder(
    server_factory: ServerFactory, reaper: Reaper, tmp_path: Path
) -> None:
    """The daemon is started without the working directory on its import path."""
    server = await server_factory(start=False)
    shadow = tmp_path / "checkout"
    (shadow / "petit").mkdir(parents=True)
    (shadow / "petit" / "__init__.py").write_text("raise ImportError('shadowed by ./petit')\n")
    with trio.fail_after(CLI_TIMEOUT):
        done = await trio.run_process(
            [PETIT_SERVER, "start", "-c", server.config],
            cwd=shadow,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    match = re.search(rb"Server started with pid (\d+)\.", done.stdout)
    assert done.returncode == 0, done.stderr
    assert match is not None, done.stdout
    reaper.track_daemon(int(match[1]))
    info = server.running()
    assert info is not None
    server.adopt(info)
    await server.stop()


async def test_one_address_registers_at_most_registrations_per_minute(
    server_factory: ServerFactory, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    server = await server_factory(registrationsPerMinute=2)
    client = await client_factory(server, python_backend.port, start=False)  # the first
    await client.cli("register", "-t", "second")
    refused = await client.cli("register", "-t", "third", check=False)
    assert refused.returncode != 0
    # At most 30 s (one registration per 30 s refills); less as time passes.
    assert re.search(
        r"too many registrations from 127\.0\.0\.1: try again in \d+ s", refused.stderr
    )
    assert len(json.loads(server.registry.read_text())["registrations"]) == 2


async def test_init_names_each_certificate_host_once(server_factory: ServerFactory) -> None:
    server = await server_factory(start=False)  # init --hostname localhost
    (line,) = [
        line
        for line in server.outputs["init"].stdout.splitlines()
        if line.startswith("Created server certificate")
    ]
    assert line.endswith('server.crt" for localhost.'), line


async def test_init_sets_where_the_control_port_and_admin_api_listen(tmp_path: Path) -> None:
    """What init prints is what it wrote: the container's entrypoint relies on both."""
    config = tmp_path / "server" / "config.toml"
    addresses = ["--hostname", "localhost", "--listen-addr", "*", "--admin-addr", "0.0.0.0"]
    init = await run_cli([PETIT_SERVER, "init", "-c", config, *addresses])
    table = tomllib.loads(config.read_text())["server"]
    assert (table["listenAddr"], table["adminAddr"]) == ("*", "0.0.0.0")
    assert "\nControl port on *:3016.\nAdmin API on 0.0.0.0:8100 (token: " in init.stdout

    default = tmp_path / "default" / "config.toml"
    init = await run_cli([PETIT_SERVER, "init", "-c", default, "--hostname", "localhost"])
    table = tomllib.loads(default.read_text())["server"]
    assert (table["listenAddr"], table["adminAddr"]) == ("127.0.0.1", "127.0.0.1")
    assert "\nControl port on 127.0.0.1:3016.\nAdmin API on 127.0.0.1:8100 " in init.stdout

    nowhere = tmp_path / "refused" / "config.toml"
    refused = await run_cli([PETIT_SERVER, "init", "-c", nowhere, "--admin-addr", ""], check=False)
    assert refused.returncode == 2, refused
    assert refused.stderr.startswith("error: Invalid value for '--admin-addr': "), refused
    assert (refused.stdout, refused.stderr.count("\n")) == ("", 1), refused
    assert not nowhere.parent.exists()


async def test_config_shows_the_registry_path_as_it_is(tmp_path: Path) -> None:
    """No recasing: a path with capitals (``/srv/Petit``) must be shown as it is."""
    config = tmp_path / "Petit State" / "config.toml"
    await run_cli([PETIT_SERVER, "init", "-c", config, "--hostname", "localhost"])
    shown = (await run_cli([PETIT_SERVER, "config", "-c", config])).stdout
    registry = config.parent / "registry.json"
    assert f"Registry {registry}: 0 registration(s), 0 enrollment token(s)" in shown


async def test_config_admin_token_prints_the_token_alone(tmp_path: Path) -> None:
    """What scripts and the README use: TOKEN=$(petit-server config --admin-token)."""
    config = tmp_path / "server" / "config.toml"
    await run_cli([PETIT_SERVER, "init", "-c", config, "--hostname", "localhost"])
    token = tomllib.loads(config.read_text())["server"]["adminToken"]
    shown = await run_cli([PETIT_SERVER, "config", "-c", config, "--admin-token"])
    assert shown.stdout == f"{token}\n"
    assert token not in (await run_cli([PETIT_SERVER, "config", "-c", config])).stdout

    document = tomllib.loads(config.read_text())
    del document["server"]["adminToken"]  # the admin API off
    config.write_text(tomli_w.dumps(document))
    refused = await run_cli([PETIT_SERVER, "config", "-c", config, "--admin-token"], check=False)
    assert refused.returncode == 3, refused
    assert refused.stderr.count("\n") == 1, refused
    assert refused.stderr.startswith("error: "), refused
    assert "sets no [server] adminToken, so the admin API is off" in refused.stderr


@pytest.mark.parametrize("bind", ["*", ["127.0.0.1", "::1"]])
async def test_the_public_ports_listen_on_ipv4_and_ipv6_at_once(
    bind: str | list[str],
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    python_backend: PythonBackend,
) -> None:
    """bindAddr "*" failed with trio's "more than 1 listener" RuntimeError, and "::" alone
    is IPv6 only: "*" and a list of addresses serve both families, on one port each."""
    server = await server_factory(bindAddr=bind, tcpAddr=bind)
    client = await client_factory(server, python_backend.port)
    with trio.fail_after(30):
        for address in ("127.0.0.1", "::1"):
            async with await trio.open_tcp_stream(address, server.http_port) as stream:
                await stream.send_all(
                    f"GET / HTTP/1.1\r\nHost: {client.host}\r\nConnection: close\r\n\r\n".encode()
                )
                answer = b""
                while chunk := await stream.receive_some():
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 "), (address, answer[:100])


async def test_the_tunnel_check_is_answered_by_the_client_without_the_private_service(
    server: PetitServer, client_factory: ClientFactory
) -> None:
    """The original's GET /-g2c-intercept: 200 {"success": true} from the client itself, so
    a caller can test the tunnel while the private service is down (here: nothing listens)."""
    client = await client_factory(server, free_port())
    with trio.fail_after(30):
        for target in ("/-g2c-intercept", "/-g2c-intercept/anything?x=1"):
            check = await http_request(server.http_port, client.host, target=target)
            assert (check.status, check.body) == (200, b'{"success": true}\n'), check
        # Anything else goes to the private service, which is down: 502.
        assert (await http_request(server.http_port, client.host, target="/")).status == 502
        posted = await http_request(
            server.http_port, client.host, "POST", "/-g2c-intercept", body=b"x"
        )
        assert posted.status == 502
