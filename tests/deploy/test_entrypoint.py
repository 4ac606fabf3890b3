"""The container entrypoint, without a container: every way of stopping ends cleanly.

SIGINT (Ctrl-C in compose), SIGTERM (compose stop) and STOP on the control port exit 0 and
remove the lock and pid files; after kill -9 the next start takes the stale lock over. On the
first start, what init prints is where the server then listens.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from petit.control import send_control
from petit.lockfile import read_pid
from tests.integration.harness import edit_config, wait_until

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO / "deploy" / "server-entrypoint.sh"
VENV_BIN = Path(sys.executable).parent


def _prepare_state(state: Path) -> None:
    subprocess.run(
        [str(VENV_BIN / "petit-server"), "init", "-c", str(state / "config.toml")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    edit_config(
        state / "config.toml",
        "server",
        bindAddr="127.0.0.1",
        backPort=0,
        proxyPort=0,
        listenPort=0,
        adminPort=0,
        shutdownGrace=1,
    )


def _start(state: Path, *, bin_first: Path = VENV_BIN) -> subprocess.Popen[bytes]:
    """The entrypoint on ``state``, its output in entrypoint.log; ``bin_first`` is where it
    finds petit-server."""
    environment = {
        **os.environ,
        "PETIT_STATE": str(state),
        "PATH": f"{bin_first}:{VENV_BIN}:{os.environ['PATH']}",
    }
    state.mkdir(parents=True, exist_ok=True)
    output = (state / "entrypoint.log").open("ab")
    return subprocess.Popen(
        [str(ENTRYPOINT)],
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=output,
        start_new_session=True,
    )


async def _wait_ready(state: Path, process: subprocess.Popen[bytes]) -> int:
    def ready() -> bool:
        info = read_pid(state, "server")
        return info is not None and info.pid == process.pid and bool(info.extra.get("ready"))

    await wait_until(ready, timeout=20, what="the entrypoint's server to be ready")
    info = read_pid(state, "server")
    assert info is not None
    return info.listen


async def _wait_exit(process: subprocess.Popen[bytes]) -> int:
    await wait_until(lambda: process.poll() is not None, timeout=20, what="the server to exit")
    code = process.poll()
    assert code is not None
    return code


@pytest.mark.integration
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "STOP"])
async def test_entrypoint_stops_cleanly(tmp_path: Path, how: str) -> None:
    _prepare_state(tmp_path)
    process = _start(tmp_path)
    try:
        control_port = await _wait_ready(tmp_path, process)
        if how == "STOP":
            with trio.fail_after(10):
                reply = await send_control("127.0.0.1", control_port, "STOP")
            assert reply["success"] is True
        else:
            process.send_signal(getattr(signal, how))
        assert await _wait_exit(process) == 0
        assert not (tmp_path / "server.pid").exists()
        assert not (tmp_path / "server.lock").exists()
        assert (tmp_path / "registry.json").exists()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.integration
async def test_entrypoint_restarts_after_kill_9(tmp_path: Path) -> None:
    _prepare_state(tmp_path)
    first = _start(tmp_path)
    second: subprocess.Popen[bytes] | None = None
    try:
        await _wait_ready(tmp_path, first)
        first.send_signal(signal.SIGKILL)
        assert await _wait_exit(first) == -signal.SIGKILL
        assert (tmp_path / "server.lock").exists(), "kill -9 leaves the lock file behind"
        second = _start(tmp_path)
        await _wait_ready(tmp_path, second)
        assert "took over a stale lock" in (tmp_path / "entrypoint.log").read_text()
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)


# petit-server for the entrypoint's first start, on ports the system chooses: the defaults
# (3014, 8090, 3016, 8100...) may be taken on a test machine.
PORTS_ZERO_SHIM = f"""#!/bin/sh
if [ "$1" = start ]; then
  sed -i -E 's/^(backPort|proxyPort|secureProxyPort|listenPort|adminPort) = .*/\\1 = 0/' \\
    "$PETIT_STATE/config.toml"
fi
exec {VENV_BIN / "petit-server"} "$@"
"""


def _listening_ipv4(port: int) -> set[ipaddress.IPv4Address]:
    """The IPv4 addresses a socket listens on at ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        host, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
            found.add(ipaddress.IPv4Address(bytes.fromhex(host)[::-1]))
    return found


@pytest.mark.integration
async def test_first_start_prints_where_the_control_port_and_admin_api_listen(
    tmp_path: Path,
) -> None:
    shim = tmp_path / "bin" / "petit-server"
    shim.parent.mkdir()
    shim.write_text(PORTS_ZERO_SHIM)
    shim.chmod(0o755)
    state = tmp_path / "state"
    process = _start(state, bin_first=shim.parent)
    try:
        await _wait_ready(state, process)
        printed = (state / "entrypoint.log").read_text()
        info = read_pid(state, "server")
        assert info is not None
        ports = info.extra["ports"]
        assert isinstance(ports, dict), info
        for what, port in (("Control port", ports["control"]), ("Admin API", ports["admin"])):
            said = re.search(rf"^{what} on ([0-9.]+):\d+", printed, re.MULTILINE)
            assert said, printed
            assert _listening_ipv4(port) == {ipaddress.IPv4Address(said[1])}, printed
            assert said[1] == "0.0.0.0", printed  # the host's published port reaches it
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
