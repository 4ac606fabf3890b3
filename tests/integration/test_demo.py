"""The README's first command keeps working: ./demo/run sets up and serves through a tunnel."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_demo_check_reaches_the_sample_backend_through_the_tunnel(tmp_path: Path) -> None:
    environment = {**os.environ, "PETIT_DEMO_STATE": str(tmp_path / "demo")}
    result = subprocess.run(
        [str(REPO / "demo" / "run"), "--check"],
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "from the private service behind petit" in result.stdout
    assert "demo check: OK" in result.stdout
    assert not (tmp_path / "demo" / "server" / "server.pid").exists(), "demo left its server up"
    assert not (tmp_path / "demo" / "client" / "client.pid").exists(), "demo left its client up"


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="a new PID namespace needs root")
def test_the_demo_backend_as_pid_1_stops_at_once_on_sigterm(tmp_path: Path) -> None:
    """In a container the backend is PID 1, which the kernel does not kill with a signal left
    at its default action: without a handler `down` waited 10 s for SIGKILL. Run it as PID 1
    of a new PID namespace (unshare) and send SIGTERM from outside, as podman does."""
    port = _free_port()
    namespace = subprocess.Popen(
        [
            "unshare",
            "--pid",
            "--fork",
            "--kill-child",
            sys.executable,
            "demo/backend.py",
            str(port),
        ],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )
    try:
        backend_pid = _wait_for_child(namespace.pid)
        _wait_listening(port)
        os.kill(backend_pid, signal.SIGTERM)
        assert namespace.wait(timeout=10) == 0
    finally:
        if namespace.poll() is None:
            namespace.kill()
            namespace.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for_child(parent: int) -> int:
    """The pid (in our namespace) of ``parent``'s only child, once it exists (bounded)."""
    children = Path(f"/proc/{parent}/task/{parent}/children")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if pids := children.read_text().split():
            return int(pids[0])
        time.sleep(0.02)  # noqa: TID251 - polling another process
    raise AssertionError("unshare started no child")


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.02)  # noqa: TID251 - polling another process
    raise AssertionError(f"the demo backend did not listen on {port}")
