"""The scale run works end to end with a few clients (the 1,000-client run is bench/scale.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_scale_smoke_connects_every_client_and_answers_every_request(tmp_path: Path) -> None:
    output = tmp_path / "scale.json"
    scale = str(REPO / "bench" / "scale.py")
    result = subprocess.run(
        [sys.executable, scale, "--clients", "20", "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(output.read_text())
    assert figures["clients"] == 20
    assert figures["connect_errors"] == 0
    assert figures["request_errors"] == 0
    assert figures["server_connected_mb"] > 0
