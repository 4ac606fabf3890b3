"""The workers benchmark runs end to end in smoke mode and produces every figure."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from tests.bench.helpers import run_bench

FIGURES = ("c16_req_s", "c64_req_s", "c64_p99_ms", "download_4x_mb_s")


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_workers_bench_smoke_measures_every_path(tmp_path: Path) -> None:
    stdout, figures = run_bench("workers.py", "--smoke", tmp_path=tmp_path)
    assert "workers/one" in stdout
    for path in ("ssh -R", "one", "workers"):
        for name in FIGURES:
            value = figures["paths"][path][name]
            assert math.isfinite(value), (path, name)
            assert value > 0, (path, name)
        assert figures["paths"][path]["c64_non_2xx"] == 0, path
    for path in ("one", "workers"):  # the server's CPU is its workers' too
        assert figures["paths"][path]["c64_cpu_us_server"] > 0, path
        assert figures["paths"][path]["c64_cpu_us_client"] > 0, path
