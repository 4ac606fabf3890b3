"""The README's first command keeps working: ./demo/run sets up and serves through a tunnel."""

from __future__ import annotations

import os
import subprocess
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
