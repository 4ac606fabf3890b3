"""A client that stops while it is still dialling its private service for a request: the
caller is told the client is gone (503), not that the private service refused (502)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest
import trio

from tests.integration.harness import (
    UNAVAILABLE,
    ClientFactory,
    HttpResponse,
    PetitServer,
    http_request,
    wait_until,
)
from tests.integration.test_faults import server_streams

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def port_whose_connect_hangs() -> Iterator[int]:
    """A loopback port where connect() waits: its listener's accept queue is full and
    nobody accepts, so the kernel drops further SYNs."""
    with contextlib.ExitStack() as sockets:
        listener = sockets.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        for _ in range(16):
            try:
                sockets.enter_context(socket.create_connection(address, timeout=0.5))
            except TimeoutError:
                break
        else:
            pytest.skip("the kernel never let a connect() wait on a full accept queue")
        yield address[1]


async def test_a_request_being_dialled_gets_503_when_the_client_stops(
    server: PetitServer, client_factory: ClientFactory
) -> None:
    with port_whose_connect_hangs() as port:
        client = await client_factory(server, port)
        responses: list[HttpResponse] = []

        async def call() -> None:
            responses.append(await http_request(server.http_port, client.host, timeout=20))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await wait_until(
                lambda: _one_stream_pending(server, client.registration_id),
                10,
                what="the request's stream to be opened",
            )
            await client.stop()
    assert [(r.status, r.body) for r in responses] == [(503, UNAVAILABLE)], responses


async def _one_stream_pending(server: PetitServer, registration_id: str) -> bool:
    return await server_streams(server, registration_id) == 1
