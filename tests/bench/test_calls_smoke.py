"""The call and syscall counts come out for every workload and role.

Without ``--baseline``: each petit costs three runs of its three daemons under cProfile (107 s
on a loaded machine for two petits), and ``bench/ab.py``'s smoke test runs a revision's petit.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.bench.helpers import run_bench

ROWS = [
    f"{workload}: {measure}, {role}"
    for workload in ("redis GET, TCP port", "HTTP 1 KiB GET")
    for measure in ("Python calls", "syscalls")
    for role in ("server", "client")
]


@pytest.mark.integration
def test_calls_counts_every_row(tmp_path: Path) -> None:
    stdout, result = run_bench("calls.py", "--requests", "50", tmp_path=tmp_path)
    assert result["requests"] == 50
    figures = result["figures"]["petit"]
    assert sorted(figures) == sorted(ROWS)
    for row in ROWS:
        assert row in stdout
        # a relay makes at least one call and one syscall per request on each side
        assert 1 <= figures[row] < math.inf, (row, figures[row])
