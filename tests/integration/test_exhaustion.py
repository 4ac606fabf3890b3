"""A server out of file descriptors: one log line per interval, no tracebacks, and it serves
again as soon as descriptors are free (a real daemon under ``prlimit``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio

from tests.integration.harness import (
    ServerFactory,
    http_request,
    tail,
    wait_exit,
    wait_pid_file,
    wait_until,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) is missing"),
]

DESCRIPTORS = 64  # the daemon's open-file limit, soft and hard: a flood of 100 runs it out
FLOOD = 100  # idle connections
TIMEOUT = 30.0  # seconds for the whole exchange


async def test_an_ingress_out_of_descriptors_logs_a_line_per_interval_and_recovers(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = await server_factory(start=False)
    output = tmp_path / "server-foreground.log"
    child = server.spawn_foreground(output, wrapper=["prlimit", f"--nofile={DESCRIPTORS}"])
    server.adopt(await wait_pid_file(server.directory, "server", child, output))
    flood: list[trio.SocketStream] = []
    with trio.fail_after(TIMEOUT):
        try:
            for _ in range(FLOOD):  # the kernel completes them; the server accepts what it can
                flood.append(await trio.open_tcp_stream("127.0.0.1", server.http_port))
            await wait_until(
                lambda: "cannot accept connections" in server.log.read_text(),
                TIMEOUT,
                what="the out-of-descriptors warning",
            )
        finally:
            for connection in flood:
                await connection.aclose()
        # Descriptors come back as the server sees its callers gone; then it serves again.
        response = await http_request(server.http_port, "nobody.localhost", timeout=TIMEOUT)
        assert response.status == 404, response
    log = server.log.read_text()
    assert log.count("cannot accept connections: Too many open files") <= 2, tail(server.log)
    assert "Traceback" not in log + output.read_text(), tail(server.log)
    await server.stop()
    assert await wait_exit(child) == 0, tail(output)
