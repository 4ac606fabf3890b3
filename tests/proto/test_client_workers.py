"""What the client reads from a WELCOME about the server's workers (petit_server.workers)."""

from __future__ import annotations

import pytest

from petit.auth import MAX_WORKERS
from petit_client.service import _worker_place


@pytest.mark.parametrize(
    ("welcome", "place"),
    [
        ({}, (None, 1)),  # a server without workers, or older than them
        ({"worker": 0, "workers": 2}, (0, 2)),
        ({"worker": 3, "workers": 4}, (3, 4)),
        ({"worker": 2, "workers": 2}, (None, 1)),  # no such index
        ({"worker": -1, "workers": 2}, (None, 1)),
        ({"worker": True, "workers": 2}, (None, 1)),  # JSON true is no index
        ({"worker": "1", "workers": 2}, (None, 1)),
        ({"worker": 0, "workers": 2.0}, (None, 1)),
        ({"worker": 0}, (None, 1)),
        ({"worker": 5, "workers": 10_000}, (5, MAX_WORKERS)),  # sessions stay bounded
    ],
)
def test_the_worker_place_in_a_welcome(
    welcome: dict[str, object], place: tuple[int | None, int]
) -> None:
    assert _worker_place(welcome) == place
