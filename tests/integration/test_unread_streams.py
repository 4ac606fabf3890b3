"""A registration whose public callers never read while its private service pushes: the
server holds at most the small window it announced per stream, not the client's, and keeps
serving everyone else (real server and client processes on loopback)."""

from __future__ import annotations

import pytest
import trio

from petit.connection import SERVER_WINDOW, WINDOW_GROWTH_BUDGET
from tests.integration.harness import (
    ClientFactory,
    ServerFactory,
    http_request,
    rss_kib,
    serve_on_loopback,
    wait_until,
)

pytestmark = pytest.mark.integration

FLOOD = 200  # public connections that never read
SERVER_OVERHEAD = 8 * 1024 * 1024  # bytes: 200 idle callers cost the server about 3 MB
# Per stream, the window in the session's buffer and one chunk its relay took and cannot pass
# on; growth within the tunnel's budget: 49 MiB. With 1 MiB windows it grew 188 MiB.
RSS_GROWTH_LIMIT = (FLOOD * 2 * SERVER_WINDOW + WINDOW_GROWTH_BUDGET + SERVER_OVERHEAD) // 1024
QUIET = 1.0  # seconds without a byte pushed: every stream is as full as flow control allows
TIMEOUT = 60.0  # seconds for the whole flood
CHUNK = bytes(64 * 1024)
OK = b"ok\n"


class PushingBackend:
    """A private service: ``GET /flood`` gets an endless body pushed as fast as the tunnel
    takes it; anything else a short answer. It notes when it last pushed a byte."""

    def __init__(self) -> None:
        self.floods = 0  # /flood requests seen
        self.last_push = trio.current_time()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        await serve_on_loopback(self._answer, task_status=task_status)

    async def _answer(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await self._push(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the client gave up on the stream

    async def _push(self, stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head and (data := await stream.receive_some()):
            head += data
        if not head.startswith(b"GET /flood "):
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n" + OK)
            return
        self.floods += 1
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % 2**40)
        while True:
            await stream.send_all(CHUNK)
            self.last_push = trio.current_time()

    def quiet(self) -> bool:
        return trio.current_time() - self.last_push > QUIET


async def caller_that_never_reads(port: int, host: str) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(f"GET /flood HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return stream


async def test_callers_that_never_read_cost_the_server_only_small_windows(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    backend = PushingBackend()
    async with trio.open_nursery() as nursery:
        backend_port = await nursery.start(backend.serve)
        server = await server_factory()
        client = await client_factory(server, backend_port)
        warm_up = await http_request(server.http_port, client.host, target="/ok")
        assert warm_up.body == OK, warm_up
        before = rss_kib(server.pid)
        flood: list[trio.SocketStream] = []
        with trio.fail_after(TIMEOUT):
            for _ in range(FLOOD):
                flood.append(await caller_that_never_reads(server.http_port, client.host))
            await wait_until(lambda: backend.floods == FLOOD, TIMEOUT, what="every flood")
            await wait_until(backend.quiet, TIMEOUT, what="flow control to stop the pushes")
        growth = rss_kib(server.pid) - before
        print(f"server RSS {before} KiB, +{growth} KiB with {FLOOD} unread streams")
        with trio.fail_after(1):
            response = await http_request(server.http_port, client.host, target="/ok")
        assert response.body == OK, response
        assert growth <= RSS_GROWTH_LIMIT, f"server RSS grew {growth} KiB ({RSS_GROWTH_LIMIT=})"
        for stream in flood:
            await stream.aclose()
        nursery.cancel_scope.cancel()
