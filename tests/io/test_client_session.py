"""What the client's commands rely on in the trio driver: server pings, splice to TLS, traffic."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from petit.connection import Role, TunnelConnection
from petit.session import SessionClosedError, StreamCarrier, Traffic, TunnelSession, splice

from .helpers import QUIET_PING_INTERVAL as QUIET, Served, StallableCarrier, handshake, session_pair

TIMEOUT = 10  # seconds bounding each test


async def test_ping_round_trip_waits_for_its_own_pong() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await session_pair(nursery)
            client = pair.client.session
            # Two pings at once: each is answered by the pong that carries its own opaque.
            async with trio.open_nursery() as pings:
                results: list[float] = []

                async def ping() -> None:
                    results.append(await client.ping_round_trip())

                pings.start_soon(ping)
                pings.start_soon(ping)
            assert len(results) == 2
            assert all(0 <= seconds < TIMEOUT for seconds in results)
            assert client._pong_waiters == {}
            nursery.cancel_scope.cancel()


async def deaf_client(nursery: trio.Nursery) -> Served:
    """A serving client session whose carrier no longer delivers (the server still answers)."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    carrier = StallableCarrier(client_stream)
    client = TunnelSession(TunnelConnection(Role.CLIENT), carrier, ping_interval=QUIET)
    server = TunnelSession(
        TunnelConnection(Role.SERVER), StreamCarrier(server_stream), ping_interval=QUIET
    )
    await handshake(client, server)
    carrier.stalled = True
    served = Served(client)
    await nursery.start(Served(server).run)
    await nursery.start(served.run)
    return served


async def test_an_unanswered_ping_is_bounded_by_the_caller(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            client = (await deaf_client(nursery)).session
            with trio.move_on_after(1) as waited:
                await client.ping_round_trip()
            assert waited.cancelled_caught
            assert client._pong_waiters == {}  # the cancelled ping left nothing behind
            nursery.cancel_scope.cancel()


async def test_ping_round_trip_fails_when_the_session_ends() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            served = await deaf_client(nursery)

            async def end_session_once_pinging() -> None:
                await trio.testing.wait_all_tasks_blocked()
                served.cancel_scope.cancel()

            nursery.start_soon(end_session_once_pinging)
            with pytest.raises(SessionClosedError):
                await served.session.ping_round_trip()
            await served.finished.wait()
            with pytest.raises(SessionClosedError):
                await served.session.ping_round_trip()  # a ping after the end fails at once
            nursery.cancel_scope.cancel()


class WholeStream(trio.abc.Stream):
    """A stream that cannot half-close, like trio.SSLStream."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self._inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_splice_to_a_stream_without_half_close_and_counts_the_bytes() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await session_pair(nursery)
            public, tunnel_end = await pair.open_stream_pair()
            local_service, local_end = trio.testing.memory_stream_pair()
            traffic = Traffic()
            spliced = trio.Event()

            async def run_splice() -> None:
                await splice(tunnel_end, WholeStream(local_end), traffic)
                spliced.set()

            nursery.start_soon(run_splice)
            await public.send_all(b"request")
            assert await local_service.receive_some() == b"request"
            await public.send_eof()  # cannot be passed on: that direction just stops
            await local_service.send_all(b"the answer goes on")
            assert await public.receive_some() == b"the answer goes on"
            assert not spliced.is_set()
            await local_service.send_eof()
            assert await public.receive_some() == b""
            await spliced.wait()
            assert (traffic.a_to_b, traffic.b_to_a) == (len(b"request"), len(b"the answer goes on"))
            nursery.cancel_scope.cancel()


async def test_close_ends_a_serving_session_and_tells_the_peer() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await session_pair(nursery)
            public, _ = await pair.open_stream_pair()
            pair.client.session.close("the client's registrations changed")
            await pair.client.finished.wait()
            assert pair.client.error is None  # serve returned: a clean end, not a failure
            await pair.server.finished.wait()
            assert pair.server.session.going_away is not None
            assert "registrations changed" in pair.server.session.close_reason
            with pytest.raises(trio.BrokenResourceError):
                await public.send_all(b"too late")
            nursery.cancel_scope.cancel()
