"""The benchmark runs end to end in smoke mode and produces every figure (no timing asserts)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.bench.helpers import in_git_checkout, run_bench

PATHS = ("direct", "ssh -R", "petit", "petit@HEAD")
FIGURES = (
    "c16_req_s",
    "c16_p50_ms",
    "c16_p99_ms",
    "c64_req_s",
    "c64_p50_ms",
    "c64_p99_ms",
    "download_1x_mb_s",
    "download_1x_best_mb_s",
    "download_4x_mb_s",
    "download_4x_best_mb_s",
    "new_connection_ms",
)
TCP_FIGURES = (
    "tcp_get_c1_req_s",
    "tcp_get_c50_req_s",
    "tcp_set_c50_req_s",
    "tcp_ping_p50_ms",
    "tcp_ping_p99_ms",
)


CPU_FIGURES = (
    "c16_cpu_us_server",
    "c16_cpu_us_client",
    "c64_cpu_us_server",
    "c64_cpu_us_client",
    "tcp_get_c1_cpu_us_server",
    "tcp_get_c1_cpu_us_client",
)


@pytest.mark.integration
@pytest.mark.skipif(not in_git_checkout(), reason="--baseline needs a git checkout")
def test_bench_smoke_produces_every_figure(tmp_path: Path) -> None:
    """Every figure on every path, with the committed code measured beside the working tree."""
    stdout, figures = run_bench("run.py", "--smoke", "--baseline", "HEAD", tmp_path=tmp_path)
    assert "petit/ssh" in stdout
    assert "/petit@HEAD" in stdout
    for path in PATHS:
        for name in FIGURES:
            value = figures["paths"][path][name]
            assert math.isfinite(value), (path, name)
            assert value > 0, (path, name)
        assert figures["paths"][path]["c64_non_2xx"] == 0, path
    for path in PATHS:  # redis-benchmark through each path; petit's is a raw TCP port
        for name in TCP_FIGURES:
            value = figures["paths"][path][name]
            assert math.isfinite(value), (path, name)
            assert value > 0, (path, name)
    for floor in ("floor", "floor, threads"):  # the floors of petit's design (bench/floor*.py)
        for name in TCP_FIGURES:
            value = figures["paths"][floor][name]
            assert math.isfinite(value), (floor, name)
            assert value > 0, (floor, name)
        assert figures["paths"][floor]["tcp_get_c1_cpu_us_server"] >= 0
        assert f"/{floor}" in stdout
    for path in PATHS[2:]:  # CPU per request of petit's own processes
        for name in CPU_FIGURES:
            assert figures["paths"][path][name] >= 0, (path, name)
        assert figures["paths"][path]["c64_cpu_us_server"] > 0, path
    for path in PATHS[1:]:  # the long-link row: through the delay relay
        assert figures["paths"][path]["wan_download_mb_s"] > 0, path
        assert figures["paths"][path]["wan_beside_slow_mb_s"] > 0, path
    assert math.isnan(figures["paths"]["direct"]["wan_download_mb_s"])
    memory = figures["memory"]
    for role in ("server", "client"):
        for phase in ("idle", "load", "after"):
            assert memory[f"{role}_{phase}_mb"] > 0
        rounds = memory[f"{role}_rounds_mb"]
        assert len(rounds) == 2
        assert all(value > 0 for value in rounds)
