"""A TCP relay that holds every chunk for a fixed time each way: a long link on loopback.

This kernel has no netem, so the benchmark puts this relay on the tunnel leg (between
petit-client and petit-server, and between ssh and sshd) to give both tunnels the same round
trip. Bandwidth is not limited: what a tunnel can carry over the link is set by its own
windows, which is what the WAN row measures. Each direction is a queue of (due time, chunk);
the writer sends a chunk once it is due, so order and spacing are kept.

Usage: python bench/delay.py LISTEN_PORT TARGET_PORT ONE_WAY_MS
"""

from __future__ import annotations

import sys
from collections import deque

import trio

CHUNK = 256 * 1024  # bytes per read


async def carry(source: trio.SocketStream, sink: trio.SocketStream, delay: float) -> None:
    """Copy source to sink, each chunk ``delay`` seconds late; EOF is passed on, late too."""
    queue: deque[tuple[float, bytes]] = deque()
    arrived = trio.Event()

    async def read() -> None:
        nonlocal arrived
        while True:
            try:
                chunk = await source.receive_some(CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            queue.append((trio.current_time() + delay, chunk))
            arrived.set()
            arrived = trio.Event()
            if not chunk:
                return

    async def write() -> None:
        while True:
            while not queue:
                await arrived.wait()
            due, chunk = queue.popleft()
            await trio.sleep_until(due)
            if not chunk:
                await sink.send_eof()
                return
            await sink.send_all(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        nursery.start_soon(write)


async def relay(client: trio.SocketStream, target_port: int, delay: float) -> None:
    """One connection: both directions delayed until both ended or one side broke."""
    async with client:
        try:
            server = await trio.open_tcp_stream("127.0.0.1", target_port)
        except OSError:
            return
        async with server:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(carry, client, server, delay)
                    nursery.start_soon(carry, server, client, delay)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


async def main(listen_port: int, target_port: int, delay: float) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        await relay(stream, target_port, delay)

    listeners = await trio.open_tcp_listeners(listen_port, host="127.0.0.1")
    await trio.serve_listeners(handle, listeners)


if __name__ == "__main__":
    listen, target, one_way_ms = (int(argument) for argument in sys.argv[1:4])
    trio.run(main, listen, target, one_way_ms / 1000)
