"""The fuzz targets take their seeds, and the seeds reach deep (a request served, a command
answered), so a target that rots into refusing everything is noticed without atheris."""

from __future__ import annotations

import pytest

from tests.fuzz.targets import SEEDS, TARGETS, ingress_answer


@pytest.mark.parametrize("name", TARGETS)
def test_each_target_takes_its_seeds(name: str) -> None:
    assert SEEDS[name]
    for seed in SEEDS[name]:
        TARGETS[name](seed)


def test_an_ingress_seed_reaches_the_private_service() -> None:
    answer = ingress_answer(SEEDS["ingress"][0][1:], 64)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:80]
    assert b"A / " in answer  # the private service's echo of the target
