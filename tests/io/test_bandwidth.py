"""The bandwidth cap over in-memory streams, in virtual time: the rate holds, and a cancelled
wait neither loses bytes already read nor keeps the tokens it had taken."""

from __future__ import annotations

import trio
import trio.testing

from petit_server.edge.bandwidth import MIN_BURST, ByteRate, CappedStream

from .helpers import session_pair

RATE = 1024  # bytes per second
SIZE = 64 * 1024  # bytes the service sends


async def test_a_cancelled_wait_keeps_the_bytes_read_and_gives_back_the_tokens(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, service = trio.testing.memory_stream_pair()
    down = ByteRate(RATE)
    capped = CappedStream(ours, ByteRate(RATE), down)
    await service.send_all(bytes(range(256)) * (SIZE // 256))
    with trio.move_on_after(1) as waiting:  # the caller gives up on this read
        await capped.receive_some()
    assert waiting.cancelled_caught
    started = trio.current_time()
    received = b""
    with trio.fail_after(10 * SIZE / RATE):  # virtual seconds
        while len(received) < SIZE:
            received += await capped.receive_some()
    assert received == bytes(range(256)) * (SIZE // 256)  # nothing lost, nothing reordered
    # The cancelled read's tokens came back: the whole transfer waited once for its debt.
    elapsed = trio.current_time() - started
    assert (SIZE - MIN_BURST) / RATE - 1 <= elapsed <= (SIZE - MIN_BURST) / RATE + 1


async def test_a_capped_stream_passes_on_the_socket_its_bytes_end_in() -> None:
    """The relay names the caller's socket to what it reads from; a cap in between passes it
    on to the tunnel stream (see petit.session.Drained), or the window growth cannot see a
    slow caller of a capped registration."""
    async with trio.open_nursery() as nursery:
        pair = await session_pair(nursery)
        tunnel_end, _ = await pair.open_stream_pair()  # the server's end, as the hub caps it
        capped = CappedStream(tunnel_end, ByteRate(10**9), ByteRate(10**9))
        near, far = trio.socket.socketpair()
        with near, far:
            capped.drains_into(near)
            assert tunnel_end.drain is near
        nursery.cancel_scope.cancel()
