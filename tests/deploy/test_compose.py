"""The container deployment really runs, stops cleanly and comes back (deploy/test).

Runs where podman is present, and always in CI (deploy/test installs podman through
../shared/tools/container-env.sh). It takes about a minute, plus the one-time base image.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.deploy
@pytest.mark.time_limit(1200)  # the image build alone may take minutes; the run is bounded below
@pytest.mark.skipif(
    shutil.which("podman") is None and not os.environ.get("CI"),
    reason="podman is not installed (CI installs it through container-env.sh)",
)
def test_compose_stack_survives_stop_sigterm_and_kill_9() -> None:
    result = subprocess.run(
        [str(REPO / "deploy" / "test")],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "deploy-test: OK" in result.stdout
