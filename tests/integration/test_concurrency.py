"""Many streams at once over one real tunnel, and per-stream flow control under a stalled reader."""

from __future__ import annotations

import random
import socket

import h11
import pytest
import trio

from tests.integration.harness import (
    ClientFactory,
    HttpConnection,
    PetitServer,
    PythonBackend,
    http_connection,
    http_request,
    payload,
    wait_until,
)

pytestmark = pytest.mark.integration

REQUESTS = 100
MAX_BODY = 1024 * 1024
STALLED_SIZE = 32 * 1024 * 1024  # far more than socket buffers plus tunnel windows can hold
FAST_SIZE = 5 * 1024 * 1024


async def test_hundred_concurrent_requests_are_byte_identical(
    server: PetitServer, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    client = await client_factory(server, python_backend.port)
    rng = random.Random(100)
    bodies = [rng.randbytes(rng.randint(0, MAX_BODY)) for _ in range(REQUESTS)]
    results: dict[int, tuple[int, bytes]] = {}

    async def one(index: int) -> None:
        response = await http_request(
            server.http_port, client.host, "POST", f"/echo/{index}", bodies[index], timeout=90
        )
        results[index] = (response.status, response.body)

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            for index in range(REQUESTS):
                nursery.start_soon(one, index)

    assert sorted(results) == list(range(REQUESTS))
    for index, (status, body) in results.items():
        assert status == 200, f"request {index}: {status}"
        assert body == bodies[index], f"request {index}: echoed body differs"
    assert (await client.control_status())["status"] == "connected"


async def test_stalled_reader_does_not_stall_other_streams(
    server: PetitServer, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    client = await client_factory(server, python_backend.port)
    stalled_path = f"/bytes/{STALLED_SIZE}"

    # The stalled caller asks for a huge response and then does not read its socket.
    raw = trio.socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    await raw.connect(("127.0.0.1", server.http_port))
    async with trio.SocketStream(raw) as stalled_stream:
        stalled = HttpConnection(stalled_stream)
        await stalled.send_request(client.host, "GET", stalled_path)

        # Wait until every buffer on the way is full and the backend is blocked writing.
        samples: list[int] = []

        def backend_blocked() -> bool:
            samples.append(python_backend.progress(stalled_path))
            recent = samples[-10:]
            return len(recent) == 10 and recent[0] > 0 and len(set(recent)) == 1

        await wait_until(backend_blocked, 20, what="the stalled stream to fill its buffers")
        blocked_at = samples[-1]
        assert blocked_at < STALLED_SIZE // 2, f"{blocked_at} bytes buffered for a stalled reader"

        # Another caller on the same tunnel moves 5 MiB each way promptly meanwhile.
        with trio.fail_after(10):
            fast = await http_request(server.http_port, client.host, "GET", f"/bytes/{FAST_SIZE}")
            body = random.Random(7).randbytes(FAST_SIZE)
            echoed = await http_request(server.http_port, client.host, "POST", "/echo", body)
        assert fast.status == 200
        assert fast.body == payload(FAST_SIZE)
        assert echoed.body == body
        still = python_backend.progress(stalled_path)
        assert still < STALLED_SIZE // 2, f"{still} bytes buffered for a stalled reader"

        # The stalled caller resumes and gets every byte, in order.
        with trio.fail_after(60):
            head = await stalled.receive_head()
            rest = await stalled.receive_body()
        assert head.status_code == 200
        assert len(rest) == STALLED_SIZE
        assert rest == payload(STALLED_SIZE)


async def test_responses_stream_without_buffering(
    server: PetitServer, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    client = await client_factory(server, python_backend.port)
    size = 1024 * 1024
    path = f"/slow/{size}"
    with trio.fail_after(30):
        async with http_connection(server.http_port) as connection:
            await connection.send_request(client.host, "GET", path)
            head = await connection.receive_head()
            assert head.status_code == 200
            first = await connection.next_event()
            # The backend writes 1 MiB in ten pieces 0.1 s apart: the first piece must arrive
            # while it is still writing, not once the whole response was collected.
            assert python_backend.progress(path) < size, "the response was buffered whole"
            rest = await connection.receive_body()
    assert isinstance(first, h11.Data)
    assert bytes(first.data) + rest == payload(size)
