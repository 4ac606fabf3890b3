"""Every failure a user can hit, for every command of both CLIs: the exit code the README's
table gives for it, and one ``error:`` line (no traceback, no click usage block).

One module-wide setup serves every row: a running server (it requires enrollment tokens), a
stopped one, configs that are missing, corrupt or unknown to the loaders, and clients that are
not registered, registered but not running, or running with their tunnel down.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from petit.daemon import ExitCode
from tests.integration.harness import (
    PETIT_CLIENT,
    PETIT_SERVER,
    PetitClient,
    Reaper,
    ServerFactory,
    edit_config,
    free_port,
    run_cli,
)

# One worker runs the whole module (./run-tests distributes by --dist loadgroup): each worker
# that ran a row built the module's setup anew, 13 s each.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("exit-codes")]

USAGE, CONFIG, AUTH = ExitCode.USAGE, ExitCode.CONFIG, ExitCode.AUTH
FAILURE, UNAVAILABLE, RUNNING = ExitCode.FAILURE, ExitCode.UNAVAILABLE, ExitCode.RUNNING

# (command line, situation, exit code). {names} are the setup's files and ports (see places).
ROWS = [
    # petit-server
    ("petit-server frob", "unknown command", USAGE),
    ("petit-server --frob", "unknown option", USAGE),
    ("petit-server init -c {server}", "config exists", CONFIG),
    ("petit-server init --frob -c {nowhere}", "unknown option", USAGE),
    ("petit-server start -c {nowhere}", "config missing", CONFIG),
    ("petit-server start -c {server_corrupt}", "config not TOML", CONFIG),
    ("petit-server start -c {server_unknown_key}", "unknown key", CONFIG),
    ("petit-server start -c {server_unknown_table}", "unknown table", CONFIG),
    ("petit-server start -c {registry_corrupt}", "registry corrupt", CONFIG),
    ("petit-server start -c {server}", "already running", RUNNING),
    ("petit-server start --foreground -c {server}", "already running", RUNNING),
    ("petit-server start -c {server_port_taken}", "port in use", UNAVAILABLE),
    ("petit-server start --foreground -c {server_port_taken}", "port in use", UNAVAILABLE),
    ("petit-server stop -c {nowhere}", "config missing", CONFIG),
    ("petit-server stop -c {stopped}", "not running", UNAVAILABLE),
    ("petit-server status -c {stopped}", "not running", UNAVAILABLE),
    ("petit-server status 4242 -c {server}", "unknown ID", FAILURE),
    ("petit-server status --frob -c {server}", "unknown option", USAGE),
    ("petit-server registrations -c {nowhere}", "config missing", CONFIG),
    ("petit-server registrations -c {registry_corrupt}", "registry corrupt", CONFIG),
    ("petit-server config -c {server_corrupt}", "config not TOML", CONFIG),
    ("petit-server config -c {server_unknown_key}", "unknown key", CONFIG),
    ("petit-server config -c {server_unknown_table}", "unknown table", CONFIG),
    ("petit-server config --admin-token -c {no_admin_token}", "no admin token", CONFIG),
    ("petit-server addalias -c {server}", "missing argument", USAGE),
    ("petit-server addalias shop.example.com 4242 -c {server}", "unknown ID", FAILURE),
    ("petit-server addalias shop.example.com 4242 -c {stopped}", "unknown ID, offline", FAILURE),
    ("petit-server addalias 1002.example.com 4242 -c {server}", "alias like an ID", FAILURE),
    ("petit-server removealias shop.example.com -c {server}", "not an alias", FAILURE),
    ("petit-server removealias -c {server}", "missing argument", USAGE),
    ("petit-server token frob -c {server}", "unknown command", USAGE),
    ("petit-server token create --note", "missing option value", USAGE),
    ("petit-server token create --for 4242 -c {server}", "unknown ID", FAILURE),
    ("petit-server token revoke 42 -c {server}", "unknown token", FAILURE),
    ("petit-server token revoke 42 -c {stopped}", "unknown token, offline", FAILURE),
    ("petit-server token list -c {nowhere}", "config missing", CONFIG),
    ("petit-server log loud -c {server}", "unknown level", USAGE),
    ("petit-server log debug -c {stopped}", "not running", UNAVAILABLE),
    ("petit-server import-registry -c {server}", "no source", USAGE),
    ("petit-server import-registry --from-file {nowhere} -c {stopped}", "no source file", CONFIG),
    ("petit-server import-registry --from-file {registry} -c {server}", "running", RUNNING),
    ("petit-server import-registry --from-redis {no_redis} -c {stopped}", "no Redis", UNAVAILABLE),
    ("petit-server migrate-registry -c {server}", "missing option", USAGE),
    ("petit-server migrate-registry --to file -c {server}", "same backend", USAGE),
    ("petit-server migrate-registry --to file --file {elsewhere} -c {server}", "running", RUNNING),
    ("petit-server service install -c {nowhere} --unit-dir {units}", "config missing", CONFIG),
    ("petit-server service uninstall --unit-dir {units}", "not installed", FAILURE),
    ("petit-server version --frob", "unknown option", USAGE),
    # petit-client
    ("petit-client frob", "unknown command", USAGE),
    ("petit-client init -c {fresh}", "config exists", CONFIG),
    ("petit-client init --server localhost:99999 -c {nowhere}", "bad --server", USAGE),
    ("petit-client init --ca {nowhere} -c {nowhere}", "no such --ca file", USAGE),
    ("petit-client init --ca {server} -c {nowhere}", "--ca not a certificate", CONFIG),
    ("petit-client register -c {nowhere}", "config missing", CONFIG),
    ("petit-client register -c {fresh}", "no token", AUTH),
    ("petit-client register --token pt_bogus -c {fresh}", "token refused", AUTH),
    ("petit-client register -c {idle}", "already registered", CONFIG),
    ("petit-client register -t bad/name -c {fresh}", "bad tenant name", USAGE),
    ("petit-client register -t other -c {idle}", "server unreachable", UNAVAILABLE),
    ("petit-client unregister -c {idle}", "no -a, -r or -t", USAGE),
    ("petit-client unregister -a -c {fresh}", "not registered", CONFIG),
    ("petit-client unregister -r 4242 -c {idle}", "unknown ID", FAILURE),
    ("petit-client unregister -a -c {idle}", "server unreachable", UNAVAILABLE),
    ("petit-client evict -c {idle}", "no -r or -t", USAGE),
    ("petit-client evict -t nobody -c {fresh}", "unknown tenant", FAILURE),
    ("petit-client lease -p 0 -c {fresh}", "bad port", USAGE),
    ("petit-client tenants -c {nowhere}", "config missing", CONFIG),
    ("petit-client config -c {client_corrupt}", "config not TOML", CONFIG),
    ("petit-client config -c {client_unknown_key}", "unknown key", CONFIG),
    ("petit-client config -c {client_unknown_table}", "unknown table", CONFIG),
    ("petit-client config --format xml -c {fresh}", "bad --format", USAGE),
    ("petit-client start -c {nowhere}", "config missing", CONFIG),
    ("petit-client start -c {client_corrupt}", "config not TOML", CONFIG),
    ("petit-client start -c {fresh}", "not registered", CONFIG),
    ("petit-client start -c {down}", "already running", RUNNING),
    ("petit-client start --foreground -c {down}", "already running", RUNNING),
    ("petit-client start -c {client_port_taken}", "port in use", UNAVAILABLE),
    ("petit-client stop -c {idle}", "not running", UNAVAILABLE),
    ("petit-client status -c {idle}", "not running", UNAVAILABLE),
    ("petit-client status -c {nowhere}", "config missing", CONFIG),
    ("petit-client sping -c {idle}", "not running", UNAVAILABLE),
    ("petit-client sping -c {down}", "tunnel down", UNAVAILABLE),
    ("petit-client log debug -c {idle}", "not running", UNAVAILABLE),
    ("petit-client log loud -c {down}", "unknown level", USAGE),
    ("petit-client service install -c {nowhere} --unit-dir {units}", "config missing", CONFIG),
    ("petit-client service uninstall --unit-dir {units}", "not installed", FAILURE),
]

PROGRAMS = {"petit-server": PETIT_SERVER, "petit-client": PETIT_CLIENT}


def _copy_with(config: Path, name: str, append: str = "", **keys: object) -> Path:
    """A copy of a daemon's ``config`` beside it (its relative paths still hold), with
    ``keys`` set in its ``[server]`` or ``[client]`` table and ``append`` at the end."""
    copy = config.with_name(name)
    shutil.copy(config, copy)
    if keys:
        edit_config(copy, "server" if "[server]" in copy.read_text() else "client", **keys)
    copy.write_text(copy.read_text() + append)
    return copy


async def _build(root: Path, reaper: Reaper) -> dict[str, str]:
    """Everything the rows name, by name: files, daemons (running or not) and dead ports."""
    servers = ServerFactory(root, reaper)
    server = await servers(requireToken=True)
    stopped = await servers(start=False)
    dead_port = free_port()

    fresh = PetitClient(root / "fresh", server, reaper)  # initialised, never registered
    await fresh.init(dead_port)
    down = PetitClient(root / "down", server, reaper)
    await down.init(dead_port)
    token = (await server.cli("token", "create")).stdout.strip()
    await down.cli("register", "--token", token)
    idle = root / "idle"  # registered, never started; its server and backend are gone
    shutil.copytree(down.directory, idle)
    edit_config(idle / "config.toml", "client", backPort=dead_port)
    edit_config(down.config, "client", backPort=dead_port)
    await down.start(wait_connected=False)  # runs, but its tunnel is down

    (root / "broken-registry.json").write_text("{")
    without_token = stopped.config.with_name("no-admin-token.toml")
    without_token.write_text(
        "".join(
            line
            for line in stopped.config.read_text().splitlines(keepends=True)
            if not line.startswith("adminToken")
        )
    )
    places = {
        "server": server.config,
        "stopped": stopped.config,
        "registry": server.registry,
        "fresh": fresh.config,
        "down": down.config,
        "idle": idle / "config.toml",
        "nowhere": root / "nowhere" / "config.toml",
        "elsewhere": root / "elsewhere.json",
        "units": root / "units",
        "no_redis": f"redis://127.0.0.1:{dead_port}/0",
        "no_admin_token": without_token,
        "server_corrupt": _copy_with(stopped.config, "corrupt.toml", "not TOML\n"),
        "server_unknown_key": _copy_with(stopped.config, "unknown-key.toml", frob=1),
        "server_unknown_table": _copy_with(stopped.config, "unknown-table.toml", "[frob]\n"),
        "registry_corrupt": _copy_with(
            stopped.config, "broken.toml", registryfile=str(root / "broken-registry.json")
        ),
        "server_port_taken": _copy_with(
            stopped.config, "port-taken.toml", backPort=server.tunnel_port
        ),
        "client_corrupt": _copy_with(fresh.config, "corrupt.toml", "not TOML\n"),
        "client_unknown_key": _copy_with(fresh.config, "unknown-key.toml", frob=1),
        "client_unknown_table": _copy_with(fresh.config, "unknown-table.toml", "[frob]\n"),
        "client_port_taken": _copy_with(
            idle / "config.toml", "port-taken.toml", statusPort=server.http_port
        ),
    }
    return {name: str(value) for name, value in places.items()}


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The setup every row runs in, built once for the module; its processes die after."""
    reaper = Reaper()
    try:
        yield trio.run(_build, tmp_path_factory.mktemp("exit-codes"), reaper)
    finally:
        reaper.reap()


@pytest.mark.parametrize(
    ("command", "situation", "expected"),
    ROWS,
    ids=[f"{command.split(' -c ')[0]} | {situation}" for command, situation, _ in ROWS],
)
async def test_a_failure_exits_with_its_code_and_one_error_line(
    places: dict[str, str], command: str, situation: str, expected: ExitCode
) -> None:
    program, *args = command.format(**places).split()
    result = await run_cli([PROGRAMS[program], *args], check=False)
    output = (result.stdout + result.stderr).splitlines()
    assert result.returncode == expected, f"{situation}: {result}"
    assert len(output) == 1, f"{situation}: {result}"
    assert output[0].startswith("error: "), f"{situation}: {result}"
