"""The scale run works end to end with a few clients (the 1,000-client run is bench/scale.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.helpers import run_bench


@pytest.mark.integration
def test_scale_smoke_connects_every_client_and_answers_every_request(tmp_path: Path) -> None:
    _, figures = run_bench("scale.py", "--clients", "20", tmp_path=tmp_path)
    assert figures["clients"] == 20
    assert figures["connect_errors"] == 0
    assert figures["request_errors"] == 0
    assert figures["server_connected_mb"] > 0
