"""A bench killed outright (SIGKILL, a test's timeout) leaves none of its helpers running."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bench.helpers import REPO

# A bench that starts one helper through Bench.spawn, says its pid, and waits to be killed.
BENCH = f"""
import sys, time
sys.path.insert(0, {str(REPO / "bench")!r})
from run import bench_environment
with bench_environment() as bench:
    helper = bench.spawn(["sleep", "60"], "sleep.log")
    print(helper.pid, flush=True)
    time.sleep(60)
"""
GONE_WITHIN = 10.0  # seconds for the kernel to kill the helper once the bench is gone


def _running(pid: int) -> bool:
    """Whether ``pid`` is alive (a zombie, reaped by init in a moment, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux's setpriv")
def test_a_killed_bench_takes_its_helpers_with_it(tmp_path: Path) -> None:
    # The killed bench cannot remove its run directory: it makes it under tmp_path.
    environment = {**os.environ, "TMPDIR": str(tmp_path)}
    with subprocess.Popen(
        [sys.executable, "-c", BENCH], stdout=subprocess.PIPE, text=True, env=environment
    ) as bench:
        assert bench.stdout is not None
        helper = int(bench.stdout.readline())
        assert _running(helper)
        os.kill(bench.pid, signal.SIGKILL)
        bench.wait(timeout=10)
    deadline = time.monotonic() + GONE_WITHIN
    while _running(helper) and time.monotonic() < deadline:
        time.sleep(0.05)  # noqa: TID251 - polling /proc for another process's end
    assert not _running(helper), f"helper {helper} outlived the bench"
