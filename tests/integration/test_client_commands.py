"""Every petit-client command through the real CLI, against a real server and real backends."""

from __future__ import annotations

import contextlib
import json
import re
import ssl
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
import trio
import trustme

from petit.control import send_control
from tests.integration.harness import (
    PETIT_CLIENT,
    ClientFactory,
    PetitClient,
    PetitServer,
    PythonBackend,
    Reaper,
    ServerFactory,
    edit_config,
    free_port_block,
    http_request,
    run_cli,
    tail,
    wait_until,
)

pytestmark = pytest.mark.integration

STATE_TIMEOUT = 15.0  # seconds for a reloaded client to (re)claim its registrations


@pytest.fixture
def other_backend() -> Iterator[PythonBackend]:
    """A second local service, so each tenant can have its own."""
    backend = PythonBackend()
    yield backend
    backend.close()


@pytest.fixture
def local_ca() -> trustme.CA:
    """A CA no system trusts, for local services with "self-signed" certificates."""
    return trustme.CA()


@pytest.fixture
def tls_backend(local_ca: trustme.CA) -> Iterator[PythonBackend]:
    """The python backend behind TLS, with a certificate for 127.0.0.1 from ``local_ca``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    local_ca.issue_cert("127.0.0.1").configure_cert(context)
    backend = PythonBackend(tls=context)
    yield backend
    backend.close()


async def status_of(server: PetitServer, registration_id: str) -> int:
    """The HTTP status of a GET routed to ``registration_id``."""
    return (await http_request(server.http_port, f"{registration_id}.localhost")).status


async def wait_states(client: PetitClient, expected: dict[str, str]) -> dict[str, object]:
    """Wait until the running client reports exactly these registrations in these states."""
    seen: list[dict[str, object]] = []

    async def reached() -> bool:
        status = await client.control_status()
        seen[:] = [status]
        entries = status["registration"]
        assert isinstance(entries, list), status
        return {e["id"]: e["state"] for e in entries} == expected

    try:
        await wait_until(reached, STATE_TIMEOUT, what=f"registrations {expected}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last status {seen}\n{tail(client.log)}") from None
    return seen[0]


async def lease(client: PetitClient, port: int, *extra: str) -> Path:
    """``lease -l 127.0.0.1 -p PORT``; return the new tenant directory."""
    result = await client.cli("lease", "-l", "127.0.0.1", "-p", str(port), *extra)
    match = re.fullmatch(r'New lease at "(.+)"\.\n', result.stdout)
    assert match, result
    return Path(match[1])


def edit_tenant_local(directory: Path, **values: object) -> None:
    """Set keys of a tenant's ``[local]`` table."""
    path = directory / "config.toml"
    document = tomllib.loads(path.read_text())
    document["local"].update(values)
    path.write_text(tomli_w.dumps(document))


async def test_lease_register_while_running_tenants_status_and_config(
    server: PetitServer,
    client_factory: ClientFactory,
    python_backend: PythonBackend,
    other_backend: PythonBackend,
) -> None:
    client = await client_factory(server, python_backend.port)
    first = client.registration_id
    leased = await lease(client, other_backend.port)
    assert leased.parent == client.directory / "tenants"
    assert re.fullmatch(r"[0-9a-f]{16}", leased.name), leased

    listed = await client.cli("tenants")
    assert listed.stdout == (
        "Found tenants:\n"
        f" - default {first}  127.0.0.1:{python_backend.port} (plain)\n"
        f"   {leased.name}  127.0.0.1:{other_backend.port} (plain)\n"
    )

    # register (no -t) takes the waiting lease, and the running client serves it at once.
    registered = await client.cli("register")
    second = re.search(r"Registered with ID (\d+)", registered.stdout)
    assert second, registered
    assert f'(tenant "{leased.name}"' in registered.stdout, registered
    assert f"Client on pid {client.pid} reloaded." in registered.stdout, registered
    await wait_states(client, {first: "connected", second[1]: "connected"})

    # Each registration reaches its own local service.
    for registration_id, backend, other in (
        (first, python_backend, other_backend),
        (second[1], other_backend, python_backend),
    ):
        before, other_before = backend.connections, other.connections
        response = await http_request(server.http_port, f"{registration_id}.localhost")
        assert (response.status, response.body) == (200, PythonBackend.GET_BODY)
        assert (backend.connections, other.connections) == (before + 1, other_before)
    assert client.running() is not None
    assert client.running().pid == client.pid  # type: ignore[union-attr]  # never restarted

    status = await client.status()
    assert (status["pid"], status["status"], status["lastError"]) == (client.pid, "connected", "")
    assert status["server"] == f"127.0.0.1:{server.tunnel_port}"
    assert isinstance(status["uptime"], float)
    assert status["activeStreams"] == 0
    entries = status["registration"]
    assert isinstance(entries, list)
    for entry in entries:
        assert entry["state"] == "connected", status
        assert entry["bytesIn"] > 0, status  # the request
        assert entry["bytesOut"] > len(PythonBackend.GET_BODY), status  # the response
    assert status["bytesIn"] == sum(e["bytesIn"] for e in entries)

    listed = await client.cli("tenants")
    assert f" - {leased.name} {second[1]}  127.0.0.1:{other_backend.port} (plain)" in listed.stdout

    shown = await client.cli("config")
    lines = shown.stdout.splitlines()
    assert lines[:2] == [
        f"Registered with IDs [{first}, {second[1]}]",
        f"Verified configuration file at {client.config}.",
    ]
    assert tomllib.loads("\n".join(lines[2:]))["client"]["backPort"] == server.tunnel_port
    assert "PRIVATE KEY" not in shown.stdout


async def test_unregister_and_evict(
    server: PetitServer,
    client_factory: ClientFactory,
    python_backend: PythonBackend,
) -> None:
    client = await client_factory(server, python_backend.port)
    first = client.registration_id
    second = await client.register("extra")
    await wait_states(client, {first: "connected", second: "connected"})
    assert await status_of(server, second) == 200

    for args in ([], ["-a", "-r", first], ["-t", "extra", "-r", first]):
        misuse = await client.cli("unregister", *args, check=False)
        assert (misuse.returncode, misuse.stderr) == (
            2,
            "error: Must use exactly one of -a -r -t.\n",
        )
    unknown = await client.cli("unregister", "-r", "9999", check=False)
    assert (unknown.returncode, unknown.stderr) == (1, "error: No tenant found with ID 9999.\n")

    extra = client.directory / "tenants" / "extra"
    done = await client.cli("unregister", "-r", second)
    assert done.stdout.startswith(f"Unregistered tenant {extra}.\n"), done
    assert not extra.exists()
    assert await status_of(server, second) == 404
    assert f'"{second}"' not in server.registry.read_text()
    await wait_states(client, {first: "connected"})
    assert await status_of(server, first) == 200

    # A lease keeps its directory when unregistered; evict removes it.
    leased = await lease(client, python_backend.port)
    third = re.search(r"Registered with ID (\d+)", (await client.cli("register")).stdout)
    assert third, "no ID"
    await wait_states(client, {first: "connected", third[1]: "connected"})
    await client.cli("unregister", "-t", leased.name)
    assert sorted(p.name for p in leased.iterdir()) == ["config.toml"]
    assert await status_of(server, third[1]) == 404
    not_registered = await client.cli("unregister", "-t", leased.name, check=False)
    assert not_registered.stderr == f"error: Tenant {leased} is not registered.\n"
    evicted = await client.cli("evict", "-t", leased.name)
    assert evicted.stdout == f"Evicted tenant at {leased}.\n"
    assert not leased.exists()

    # evict of a registered tenant unregisters it first.
    fourth = await client.register("fourth")
    evicted = await client.cli("evict", "-r", fourth)
    assert evicted.stdout.startswith(f"Evicted tenant at {client.directory / 'tenants/fourth'}.\n")
    assert not (client.directory / "tenants/fourth").exists()
    assert await status_of(server, fourth) == 404
    for args, message in (
        ([], "No target specified (use '-r' or '-t')."),
        (["-r", first, "-t", "default"], "Can't use '-r' and '-t' together."),
    ):
        misuse = await client.cli("evict", *args, check=False)
        assert (misuse.returncode, misuse.stderr) == (2, f"error: {message}\n")

    everything = await client.cli("unregister", "-a")
    assert everything.stdout.startswith(
        f"Unregistered all tenants {client.directory / 'tenants/default'}.\n"
    ), everything
    assert await status_of(server, first) == 404
    assert (await client.cli("tenants")).stdout == "No tenants found.\n"

    async def listening() -> bool:
        return (await client.control_status())["status"] == "listening"

    await wait_until(listening, STATE_TIMEOUT, what="the client to wait for registrations")
    again = await client.cli("unregister", "-a", check=False)
    assert (again.returncode, again.stderr) == (3, "error: Client is not registered.\n")


async def test_sping_and_log(
    server: PetitServer, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    client = await client_factory(server, python_backend.port)
    pinged = await client.cli("sping")
    assert re.fullmatch(r"Server ping: \d+\.\d ms\n", pinged.stdout), pinged

    debug_line = "spliced to local"  # logged at debug level for every stream
    assert await status_of(server, client.registration_id) == 200
    assert debug_line not in client.log.read_text()
    changed = await client.cli("log", "debug")
    assert changed.stdout == 'Logging level set to "debug".\n'
    assert await status_of(server, client.registration_id) == 200
    await wait_until(
        lambda: debug_line in client.log.read_text(), 5, what="a debug line in the client log"
    )
    wrong = await client.cli("log", "loud", check=False)
    assert wrong.returncode == 2, wrong

    await server.stop()
    await wait_until(
        lambda: _not_connected(client), STATE_TIMEOUT, what="the client to see the server gone"
    )
    unreachable = await client.cli("sping", check=False)
    assert unreachable.returncode == 5, unreachable  # the server is out of reach
    assert unreachable.stderr.startswith("error: Can't ping: the tunnel is "), unreachable
    assert unreachable.stderr.count("\n") == 1, unreachable

    await client.stop()
    for command in (["sping"], ["log", "info"], ["status"]):
        down = await client.cli(*command, check=False)
        assert (down.returncode, down.stderr) == (5, "error: Client is not running.\n"), down


async def _not_connected(client: PetitClient) -> bool:
    return (await client.control_status())["status"] != "connected"


async def test_init_version_and_config_mask_the_proxy_password(tmp_path: Path) -> None:
    config = tmp_path / "client" / "config.toml"
    created = await run_cli([PETIT_CLIENT, "init", "-c", config, "--server", "127.0.0.1:9"])
    assert created.stdout == f'Created configuration file "{config}".\n'
    edit_config(config, "client", proxy="http://me:s3cret@127.0.0.1:3128")

    shown = await run_cli([PETIT_CLIENT, "config", "-c", config])
    lines = shown.stdout.splitlines()
    assert lines[:2] == [
        "This client isn't registered.",
        f"Verified configuration file at {config}.",
    ]
    document = tomllib.loads("\n".join(lines[2:]))
    assert document["client"]["proxy"] == "http://me:****@127.0.0.1:3128"
    assert document["client"]["local"]["tlsVerify"] is True
    as_json = await run_cli([PETIT_CLIENT, "config", "-c", config, "--format", "json", "-v"])
    assert json.loads(as_json.stdout)["client"]["proxy"] == "http://me:****@127.0.0.1:3128"
    assert "This client isn't registered." in as_json.stderr
    assert "s3cret" not in shown.stdout + shown.stderr + as_json.stdout + as_json.stderr

    version = await run_cli([PETIT_CLIENT, "version", "-c", config, "-v"])
    assert re.fullmatch(r"petit client version \S+\n", version.stdout), version


async def test_register_with_an_enrollment_token(
    server_factory: ServerFactory, reaper: Reaper, python_backend: PythonBackend, tmp_path: Path
) -> None:
    server = await server_factory(requireToken=True)
    token = (await server.cli("token", "create")).stdout.strip()
    client = PetitClient(tmp_path / "token-client", server, reaper)
    await client.init(python_backend.port)

    refused = await client.cli("register", check=False)
    assert refused.returncode == 4, refused
    assert refused.stderr.splitlines()[-1].startswith("error: Unable to register: "), refused
    assert not (client.directory / "tenants").exists() or not any(
        (client.directory / "tenants").iterdir()
    )

    from_env = await run_cli(
        [PETIT_CLIENT, "register", "-c", client.config], env={"PETIT_TOKEN": token}
    )
    assert "Registered with ID 1001 " in from_env.stdout, from_env
    reused = await client.cli("register", "-t", "again", "--token", token, check=False)
    assert reused.returncode == 4, reused  # a token enrolls once


async def test_local_tls_is_verified_unless_turned_off(
    server: PetitServer,
    client_factory: ClientFactory,
    tls_backend: PythonBackend,
    local_ca: trustme.CA,
    tmp_path: Path,
) -> None:
    client = await client_factory(server, tls_backend.port, start=False)
    edit_config(
        client.config, "client", local={"host": "127.0.0.1", "port": tls_backend.port, "tls": True}
    )
    await client.start()
    assert await status_of(server, client.registration_id) == 502  # no system CA signed it

    unverified = await lease(client, tls_backend.port, "-s")
    edit_tenant_local(unverified, tlsVerify=False)
    pinned = await lease(client, tls_backend.port, "-s")
    ca_file = tmp_path / "local-ca.pem"
    local_ca.cert_pem.write_to_path(str(ca_file))
    edit_tenant_local(pinned, ca=str(ca_file))
    ids = {}
    for tenant in (unverified, pinned):
        result = await client.cli("register", "-t", tenant.name)
        match = re.search(r"Registered with ID (\d+)", result.stdout)
        assert match, result
        ids[tenant] = match[1]
    await wait_states(client, dict.fromkeys((client.registration_id, *ids.values()), "connected"))
    for tenant in (unverified, pinned):
        response = await http_request(server.http_port, f"{ids[tenant]}.localhost")
        assert (response.status, response.body) == (200, PythonBackend.GET_BODY), tenant

    # RELOAD applies a tenant's changed target without reconnecting.
    edit_tenant_local(pinned, ca=str(tmp_path / "missing-ca.pem"))
    broken = await send_control("127.0.0.1", client.control_port, "RELOAD")
    assert broken["success"] is False, broken
    assert "missing-ca.pem" in str(broken["error"]), broken
    edit_tenant_local(pinned, tlsVerify=False, ca=str(ca_file))
    reloaded = await send_control("127.0.0.1", client.control_port, "RELOAD")
    assert (reloaded["success"], reloaded["reconnecting"]) == (True, False), reloaded


async def exchange_on_tcp_port(
    server: PetitServer, registration_id: str, tls: ssl.SSLContext | None
) -> bytes:
    """What a GET on the registration's raw TCP port gets back (plain, or over ``tls``)."""
    reply = await server.control(f"STATUS {registration_id}")
    connections = reply["connections"]
    assert isinstance(connections, list), reply
    assert connections[0]["tcpListening"], reply
    received = b""
    with trio.fail_after(STATE_TIMEOUT):
        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", connections[0]["port"])
        if tls is not None:
            stream = trio.SSLStream(stream, tls, server_hostname="127.0.0.1")
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
                while chunk := await stream.receive_some():
                    received += chunk
    return received


async def test_the_tcp_port_of_a_tls_service_passes_the_callers_tls_or_wraps_plain(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    tls_backend: PythonBackend,
    local_ca: trustme.CA,
    tmp_path: Path,
) -> None:
    """tcpTls = "passthrough" (the default): the caller's own TLS reaches the service, as
    through ssh -R; "terminate": the client wraps plain callers in its TLS. HTTP requests
    reach the service over the client's TLS either way."""
    server = await server_factory(firstPort=free_port_block(), tcpAddr="127.0.0.1")
    ca_file = tmp_path / "local-ca.pem"
    local_ca.cert_pem.write_to_path(str(ca_file))
    local = {"host": "127.0.0.1", "port": tls_backend.port, "tls": True, "ca": str(ca_file)}
    callers_tls = ssl.create_default_context(cafile=str(ca_file))
    ok = b"HTTP/1.1 200 "  # the python backend answers in HTTP/1.1

    passthrough = await client_factory(server, tls_backend.port, start=False)
    edit_config(passthrough.config, "client", local=local)
    await passthrough.start()
    rid = passthrough.registration_id
    assert await status_of(server, rid) == 200
    assert (await exchange_on_tcp_port(server, rid, callers_tls)).startswith(ok)
    assert not (await exchange_on_tcp_port(server, rid, None)).startswith(ok)
    await passthrough.stop()

    terminating = await client_factory(server, tls_backend.port, start=False)
    edit_config(terminating.config, "client", local={**local, "tcpTls": "terminate"})
    await terminating.start()
    rid = terminating.registration_id
    assert await status_of(server, rid) == 200
    assert (await exchange_on_tcp_port(server, rid, None)).startswith(ok)
