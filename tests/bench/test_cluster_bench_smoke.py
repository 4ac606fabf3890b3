"""The two-node benchmark runs end to end in smoke mode and produces every figure."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from tests.bench.helpers import run_bench

FIGURES = ("c16_req_s", "c16_p50_ms", "c64_req_s", "c64_p99_ms", "new_connection_ms")


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_cluster_bench_smoke_measures_both_nodes(tmp_path: Path) -> None:
    stdout, figures = run_bench("cluster.py", "--smoke", tmp_path=tmp_path)
    assert "forwarded/local" in stdout
    for path in ("local", "forwarded"):
        for name in FIGURES:
            value = figures["paths"][path][name]
            assert math.isfinite(value), (path, name)
            assert value > 0, (path, name)
        assert figures["paths"][path]["c16_non_2xx"] == 0, path
        assert figures["paths"][path]["c64_non_2xx"] == 0, path
