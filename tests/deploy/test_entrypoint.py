"""The container entrypoint, without a container: every way of stopping ends cleanly.

SIGINT (Ctrl-C in compose), SIGTERM (compose stop) and STOP on the control port exit 0 and
remove the lock and pid files; after kill -9 the next start takes the stale lock over.
"""

from __future__ import annotations

import os
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


def _start(state: Path) -> subprocess.Popen[bytes]:
    environment = {
        **os.environ,
        "PETIT_STATE": str(state),
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
    }
    return subprocess.Popen(
        [str(ENTRYPOINT)],
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(state / "entrypoint.log").open("ab"),
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
