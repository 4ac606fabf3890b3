"""The alternating A/B bench runs end to end in smoke mode and produces every figure."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.bench.helpers import in_git_checkout, run_bench

MEASURES = [
    f"{row}_{figure}"
    for row in ("http_c16", "http_c64")
    for figure in ("req_s", "p99_ms", "cpu_us_server", "cpu_us_client")
] + [
    f"{row}_{figure}"
    for row in ("tcp_get_c1", "tcp_get_c50")
    for figure in ("req_s", "cpu_us_server", "cpu_us_client")
]


@pytest.mark.integration
@pytest.mark.skipif(not in_git_checkout(), reason="--baseline needs a git checkout")
def test_ab_smoke_produces_every_figure_for_every_round(tmp_path: Path) -> None:
    stdout, result = run_bench("ab.py", "--smoke", "--baseline", "HEAD", tmp_path=tmp_path)
    assert "petit@HEAD" in stdout
    assert result["rounds"] == 2
    for name in ("petit", "petit@HEAD"):
        for measure in MEASURES:
            values = result["figures"][name][measure]
            assert len(values) == 2, (name, measure)
            assert all(math.isfinite(value) and value >= 0 for value in values), (name, measure)
            if measure.endswith("req_s"):
                assert min(values) > 0, (name, measure)
