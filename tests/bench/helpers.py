"""Run a benchmark script as its user would, and read the figures it writes as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """``python bench/<script> ARGS --json FILE``: its stdout and figures; fails the test on a
    non-zero exit, with the end of its output."""
    output = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args, "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures: dict[str, Any] = json.loads(output.read_text())
    return result.stdout, figures


def in_git_checkout() -> bool:
    """Whether the repository is a git checkout (``--baseline`` needs one)."""
    probe = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, check=False
    )
    return probe.returncode == 0
