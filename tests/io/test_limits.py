"""A daemon's process limits: it takes the open files its hard limit allows."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest


def test_a_daemon_raises_its_open_file_limit_to_the_hard_one() -> None:
    """A soft limit of 64 (systemd's default is 1,024) goes up to the hard limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 64:
        pytest.skip(f"the hard open-file limit here is {hard}")
    code = (
        "import resource; from petit.daemon import raise_open_file_limit as r;"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, (64, {hard}));"
        "print(r(), resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    assert output.strip() == f"(64, {hard}) ({hard}, {hard})"
