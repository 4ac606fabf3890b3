"""Coverage-guided fuzzing of each target with atheris, when asked for:
``PETIT_ATHERIS_RUNS=100000 .venv/bin/pytest tests/fuzz -s`` (atheris comes from the lock:
``scripts/bootstrap all``).
Each target runs in its own process from its seeds; the inputs run are printed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.targets import SEEDS, TARGETS

ROOT = Path(__file__).resolve().parents[2]
RUNS = int(os.environ.get("PETIT_ATHERIS_RUNS", "0"))
SECONDS_PER_INPUT = 0.05  # bound for the slowest target (ingress: a trio run with a session pair)

pytestmark = pytest.mark.skipif(
    RUNS == 0, reason="PETIT_ATHERIS_RUNS=N fuzzes each target N inputs"
)


@pytest.mark.parametrize("name", TARGETS)
def test_atheris_finds_no_crash(name: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris is missing: scripts/bootstrap all installs it")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for number, seed in enumerate(SEEDS[name]):
        (corpus / f"seed{number}").write_bytes(seed)
    argv = [sys.executable, "-m", "tests.fuzz.run", name, f"-runs={RUNS}", "-timeout=30"]
    argv += [f"-artifact_prefix={tmp_path}/", str(corpus)]
    result = subprocess.run(
        argv,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60 + RUNS * SECONDS_PER_INPUT,
        check=False,
    )
    done = re.search(r"Done (\d+) runs in (\d+) second", result.stderr)
    assert result.returncode == 0, result.stderr[-4000:]
    assert done, result.stderr[-4000:]
    grown = len(list(corpus.iterdir()))
    print(f"atheris {name}: {done[1]} inputs in {done[2]} s, corpus {grown} inputs")
