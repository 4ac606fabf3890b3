"""The call and syscall counts come out for every workload and role, of both petits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.bench.helpers import in_git_checkout, run_bench

ROWS = [
    f"{workload}: {measure}, {role}"
    for workload in ("redis GET, TCP port", "HTTP 1 KiB GET")
    for measure in ("Python calls", "syscalls")
    for role in ("server", "client")
]


@pytest.mark.integration
@pytest.mark.skipif(not in_git_checkout(), reason="--baseline needs a git checkout")
def test_calls_counts_every_row_for_both_petits(tmp_path: Path) -> None:
    stdout, result = run_bench(
        "calls.py", "--requests", "50", "--baseline", "HEAD", tmp_path=tmp_path
    )
    assert "petit/HEAD" in stdout
    assert result["requests"] == 50
    for name in ("petit", "HEAD"):
        figures = result["figures"][name]
        assert sorted(figures) == sorted(ROWS), name
        for row in ROWS:
            # a relay makes at least one call and one syscall per request on each side
            assert 1 <= figures[row] < math.inf, (name, row, figures[row])
