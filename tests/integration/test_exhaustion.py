"""Floods of idle connections against a real daemon: one source address holds no more than
its share and everyone else is served at once; and a server out of file descriptors logs one
line per interval, no tracebacks, and serves again as soon as descriptors are free (a real
daemon under ``prlimit``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio

from tests.integration.harness import (
    ServerFactory,
    http_request,
    rss_kib,
    tail,
    wait_exit,
    wait_pid_file,
    wait_until,
)

pytestmark = pytest.mark.integration
needs_prlimit = pytest.mark.skipif(
    shutil.which("prlimit") is None, reason="prlimit (util-linux) is missing"
)

DESCRIPTORS = 64  # the daemon's open-file limit, soft and hard: a flood of 100 runs it out
FLOOD = 100  # idle connections
TIMEOUT = 30.0  # seconds for the whole exchange
IDLE_FLOOD = 600  # idle connections from one address: past [server] maxConnectionsPerAddress
PER_ADDRESS = 256  # the default of that setting
RSS_GROWTH_LIMIT = 50 * 1024  # KiB


async def test_an_idle_connection_flood_from_one_address_costs_others_nothing(
    server_factory: ServerFactory,
) -> None:
    """600 connections from 127.0.0.1 that never send a byte: the server holds 256 of them,
    refuses the rest at once, grows little, and a caller from 127.0.0.2 is answered within a
    second while the flood is held."""
    server = await server_factory()
    before = rss_kib(server.pid)
    flood: list[trio.SocketStream] = []
    try:
        with trio.fail_after(TIMEOUT):
            for _ in range(IDLE_FLOOD):
                flood.append(await trio.open_tcp_stream("127.0.0.1", server.http_port))

            async def held() -> bool:
                status = await server.control("STATUS")
                return status["publicConnections"] == PER_ADDRESS

            await wait_until(held, TIMEOUT, what=f"{PER_ADDRESS} connections held")
        growth = rss_kib(server.pid) - before
        with trio.fail_after(1):
            stream = await trio.open_tcp_stream(
                "127.0.0.1", server.http_port, local_address="127.0.0.2"
            )
            async with stream:
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: nobody.localhost\r\n\r\n")
                answer = await stream.receive_some()
        assert answer.startswith(b"HTTP/1.1 404 "), answer
    finally:
        for connection in flood:
            await connection.aclose()
    print(f"idle flood: {IDLE_FLOOD} connections, {PER_ADDRESS} held, server RSS +{growth} KiB")
    assert growth <= RSS_GROWTH_LIMIT, f"server RSS grew {growth} KiB"


@needs_prlimit
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
