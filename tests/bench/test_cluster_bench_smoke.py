"""The two-node benchmark runs end to end in smoke mode and produces every figure."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIGURES = ("c16_req_s", "c16_p50_ms", "c64_req_s", "c64_p99_ms", "new_connection_ms")


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_cluster_bench_smoke_measures_both_nodes(tmp_path: Path) -> None:
    output = tmp_path / "cluster.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "cluster.py"), "--smoke", "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "forwarded/local" in result.stdout
    figures = json.loads(output.read_text())
    for path in ("local", "forwarded"):
        for name in FIGURES:
            value = figures["paths"][path][name]
            assert math.isfinite(value), (path, name)
            assert value > 0, (path, name)
        assert figures["paths"][path]["c16_non_2xx"] == 0, path
        assert figures["paths"][path]["c64_non_2xx"] == 0, path
