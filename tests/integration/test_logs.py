"""Logs of the real daemons: JSON lines, rotation, runtime levels, the audit trail, secrets.

Every log line of every file must parse as JSON (``log_records`` fails otherwise).
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

from petit.logs import cli_actor
from tests.integration.harness import (
    ClientFactory,
    PetitClient,
    PetitServer,
    PythonBackend,
    Reaper,
    ServerFactory,
    edit_config,
    http_request,
    log_records,
    wait_until,
)

SERVER_DEBUG = "routed to"  # the ingress logs every routed request at debug
CLIENT_DEBUG = "spliced to local"  # the client logs every stream at debug
LOGGED = 5.0  # seconds for a record to reach the file


def every_record(log: Path) -> list[dict[str, Any]]:
    """The records of a log and its backups, oldest first (log.N … log.1, log)."""
    backups = sorted(log.parent.glob(f"{log.name}.*"), key=lambda p: -int(p.suffix[1:]))
    return [record for path in [*backups, log] for record in log_records(path)]


def messages(log: Path, fragment: str) -> list[dict[str, Any]]:
    return [r for r in every_record(log) if fragment in r["message"]]


async def request_through(server: PetitServer, client: PetitClient) -> None:
    response = await http_request(server.http_port, client.host)
    assert response.status == 200, response


async def assert_level_changes_at_runtime(
    cli: PetitServer | PetitClient, log: Path, debug_line: str, make_traffic: Any
) -> None:
    """Debug lines appear after ``log debug`` and stop after ``log warning``."""
    await make_traffic()
    assert not messages(log, debug_line), "debug line logged at the configured info level"
    changed = await cli.cli("log", "debug")
    assert changed.stdout == 'Logging level set to "debug".\n'
    await make_traffic()
    await wait_until(
        lambda: bool(messages(log, debug_line)), LOGGED, what=f"{debug_line!r} in {log}"
    )
    assert {r["level"] for r in messages(log, debug_line)} == {"DEBUG"}

    await cli.cli("log", "warning")
    await make_traffic()
    await cli.cli("log", "warning")  # its own WARNING record marks "after the traffic"

    def both_markers() -> bool:
        return len(messages(log, "log level set to warning")) == 2

    await wait_until(both_markers, LOGGED, what="two level changes in the log")
    records = every_record(log)
    first = next(i for i, r in enumerate(records) if r["message"] == "log level set to warning")
    later = [r for r in records[first:] if r["level"] in ("DEBUG", "INFO")]
    assert not later, f"below-warning records after log warning: {later}"


async def test_both_daemons_change_level_at_runtime_and_rotate(
    server_factory: ServerFactory, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    server = await server_factory(logMaxBytes=4096, logBackups=2)
    client = await client_factory(server, python_backend.port)

    async def traffic() -> None:
        await request_through(server, client)

    await assert_level_changes_at_runtime(server, server.log, SERVER_DEBUG, traffic)
    await assert_level_changes_at_runtime(client, client.log, CLIENT_DEBUG, traffic)

    record = messages(server.log, "server ")[0]  # the ready line
    assert set(record) >= {"time", "level", "logger", "message"}, record
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", record["time"]), record

    # Rotation at 4 KiB keeping 2 backups: rotate twice, then as often again.
    await server.cli("log", "debug")
    rotated_twice = 0
    while not (server.log.parent / "server.log.2").exists():
        assert rotated_twice < 500, "no rotation after 500 requests"
        await traffic()
        rotated_twice += 1
    for _ in range(rotated_twice):
        await traffic()
    files = sorted(p.name for p in server.log.parent.glob("server.log*"))
    assert files == ["server.log", "server.log.1", "server.log.2"], files
    for path in server.log.parent.glob("server.log*"):
        assert 0 < path.stat().st_size <= 4096, path
        assert log_records(path)  # parses, line by line


def audit_events(path: Path) -> list[tuple[str, str]]:
    """(event, actor) of every audit record."""
    return [(r["event"], re.sub(r":.*", "", r["actor"])) for r in log_records(path)]


async def test_audit_trail_online_and_offline(
    server_factory: ServerFactory, python_backend: PythonBackend, reaper: Reaper, tmp_path: Path
) -> None:
    server = await server_factory(requireToken=True)
    audit = server.audit_log
    secret = (await server.cli("token", "create", "--note", "ci")).stdout.strip()
    await server.cli("token", "create")
    await server.cli("token", "revoke", "2")

    client = PetitClient(tmp_path / "client", server, reaper)
    await client.init(python_backend.port)
    registered = await client.cli("register", "--token", secret)
    rid = re.findall(r"Registered with ID (\d+)", registered.stdout)[0]
    client.registration_id = rid
    await client.start()
    await server.cli("addalias", "shop.example.com", rid)
    refused = await server.cli("addalias", "shop.example.com", rid, check=False)
    assert refused.returncode == 1, refused  # refused: nothing changed, nothing audited
    await server.cli("removealias", "shop.example.com")
    await client.cli("unregister", "-a")
    await wait_until(
        lambda: ("session.evicted", "server") in audit_events(audit), LOGGED, what="an eviction"
    )
    await server.stop()

    await server.cli("token", "create", "--note", "offline")
    await server.cli("token", "revoke", "3")
    assert audit_events(audit) == [
        ("token.created", "control"),
        ("token.created", "control"),
        ("token.revoked", "control"),
        ("registration.created", "tunnel"),
        ("token.used", "tunnel"),
        ("alias.added", "control"),
        ("alias.removed", "control"),
        ("registration.deleted", "tunnel"),
        ("session.evicted", "server"),
        ("token.created", "offline"),
        ("token.revoked", "offline"),
    ]
    records = log_records(audit)
    assert (records[3]["id"], records[4]["token"], records[5]["alias"]) == (
        rid,
        "1",
        "shop.example.com",
    ), records
    assert all(set(r) >= {"time", "level", "message", "event", "actor"} for r in records)

    leased = await client.cli("lease", "-l", "127.0.0.1", "-p", "9")
    tenant = Path(re.findall(r'New lease at "(.*)"', leased.stdout)[0]).name
    await client.cli("evict", "-t", tenant)
    # The client's commands always act by themselves, its daemon running (as here) or not.
    assert client.running() is not None
    assert audit_events(client.audit_log) == [
        ("registration.created", "cli"),
        ("registration.deleted", "cli"),
        ("tenant.evicted", "cli"),
    ]
    actors = {r["actor"] for r in log_records(client.audit_log)}
    assert actors == {cli_actor("cli")}, actors  # cli:<the user running the tests>
    assert records[-1]["actor"] == cli_actor("offline"), records  # the server's, stopped


def every_log_text(directory: Path) -> str:
    """Everything a daemon and its commands wrote under ``directory/logs``."""
    return "".join(path.read_text() for path in sorted((directory / "logs").iterdir()))


def key_material(pem_file: Path) -> list[str]:
    """The base64 lines of a PEM private key: none may appear in a log."""
    return [line for line in pem_file.read_text().splitlines() if not line.startswith("-----")]


async def test_no_secret_reaches_a_log(
    server_factory: ServerFactory, python_backend: PythonBackend, reaper: Reaper, tmp_path: Path
) -> None:
    server = await server_factory(requireToken=True, logLevel="debug")
    secret = (await server.cli("token", "create")).stdout.strip()
    client = PetitClient(tmp_path / "client", server, reaper)
    await client.init(python_backend.port)
    edit_config(client.config, "client", logLevel="debug")
    refused = await client.cli("register", "--token", secret + "x", check=False)
    assert refused.returncode == 4, refused
    registered = await client.cli("register", "--token", secret)
    client.registration_id = re.findall(r"Registered with ID (\d+)", registered.stdout)[0]
    await client.start()
    await request_through(server, client)
    await server.cli("addalias", "shop.example.com", client.registration_id)
    secrets = [secret, *key_material(client.directory / "tenants" / "default" / "key")]
    await client.cli("unregister", "-a")
    await client.stop()
    await server.stop()

    logs = every_log_text(server.directory) + every_log_text(client.directory)
    assert messages(server.log, SERVER_DEBUG), "the flow ran at debug level"
    for pem in ("server.key", "ca.key"):
        secrets += key_material(server.directory / "certificates" / pem)
    leaked = [s for s in secrets if s in logs]
    assert not leaked, f"secrets in the logs: {leaked}"


async def test_a_failed_background_start_says_why_in_one_line_and_in_the_log(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(start=False)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        for key in ("backPort", "proxyPort"):  # the second reason, not the first one again
            edit_config(server.config, "server", **{"backPort": 0, "proxyPort": 0, key: taken})
            failed = await server.cli("start", check=False)
            assert failed.returncode == 5, failed  # the daemon's own exit code
            assert failed.stderr.startswith("error: cannot listen for the "), failed
            assert failed.stderr.endswith(f"change {key}\n"), failed
            (record,) = [r for r in log_records(server.log) if f"change {key}" in r["message"]]
            assert record["level"] == "ERROR"
