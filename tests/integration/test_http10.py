"""HTTP/1.0 callers through a real server, with a real HTTP/1.0 client (curl --http1.0): one
that asks for keep-alive keeps its connection (RFC 9112 appendix C.2.2), one that does not is
closed after each answer, as before."""

from __future__ import annotations

import pytest
import trio

from tests.integration.harness import ClientFactory, PetitServer
from tests.integration.test_hostile_http import RecordingBackend

pytestmark = pytest.mark.integration

TIMEOUT = 20.0  # seconds for the curl run


async def curl_twice(port: int, host: str, *options: str) -> list[tuple[int, int, bytes]]:
    """Two GETs in one curl run: for each, (status, new connections it made, body)."""
    argv = ["curl", "-s", "--http1.0", "-H", f"Host: {host}", *options]
    write_out = "\n%{http_code} %{num_connects}\n"
    for path in ("/first", "/second"):
        argv += ["-w", write_out, f"http://127.0.0.1:{port}{path}"]
    with trio.fail_after(TIMEOUT):
        result = await trio.run_process(argv, capture_stdout=True, check=True)
    lines = result.stdout.split(b"\n")
    answers = []
    for body, counts in zip(lines[0::2], lines[1::2], strict=False):
        status, connects = counts.split()
        answers.append((int(status), int(connects), body))
    return answers


@pytest.mark.parametrize(
    ("connection", "connects"),
    [("keep-alive", [1, 0]), ("close", [1, 1])],
    ids=["keep-alive", "close"],
)
async def test_an_http10_client_keeps_its_connection_when_it_asks(
    connection: str,
    connects: list[int],
    server: PetitServer,
    client_factory: ClientFactory,
    nursery: trio.Nursery,
) -> None:
    backend = RecordingBackend("A")
    await nursery.start(backend.serve)
    client = await client_factory(server, backend.port)
    answers = await curl_twice(server.http_port, client.host, "-H", f"Connection: {connection}")
    assert answers == [
        (200, connects[0], b"A /first"),
        (200, connects[1], b"A /second"),
    ]
    assert backend.targets == [b"/first", b"/second"]
