"""The trio driver over in-memory streams: TunnelStream semantics, flow control, keepalive."""

from __future__ import annotations

import contextlib
import random
import socket

import pytest
import trio
import trio.testing

from petit.connection import DEFAULT_WINDOW, Role, TunnelConnection
from petit.errors import ErrorCode
from petit.flow import LARGEST_WINDOW
from petit.frames import FrameType, encode_header
from petit.session import (
    MAX_REPLY_BACKLOG,
    MAX_SEND_QUEUE,
    KeepaliveTimeoutError,
    SessionClosedError,
    StreamCarrier,
    StreamRefusedError,
    Traffic,
    TunnelSession,
    TunnelStream,
    splice,
)

from .helpers import (
    QUIET_PING_INTERVAL as QUIET,
    REGISTRATION_ID,
    Acceptor,
    Served,
    StallableCarrier,
    handshake,
    loopback_tcp_pair,
    session_pair,
)

TIMEOUT = 10  # seconds bounding each test (virtual seconds under autojump_clock)
PING = 1.0  # seconds: the keepalive interval of the keepalive tests


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything until EOF."""
    received = bytearray()
    while chunk := await stream.receive_some():
        received += chunk
    return bytes(received)


async def send_then_eof(stream: trio.abc.HalfCloseableStream, data: bytes) -> None:
    await stream.send_all(data)
    await stream.send_eof()


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def buffered(stream: TunnelStream) -> int:
    """Bytes received on ``stream`` and not yet read by the application."""
    return sum(len(chunk) for chunk in stream._buffer)


# The trio stream contract.


async def test_tunnel_stream_passes_trio_conformance_suite() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def stream_maker() -> tuple[TunnelStream, TunnelStream]:
                pair = await session_pair(nursery)
                return await pair.open_stream_pair()

            async def clogged_stream_maker() -> tuple[TunnelStream, TunnelStream]:
                pair = await session_pair(nursery, client_window=1, server_window=1)
                server_stream, client_stream = await pair.open_stream_pair()
                # Spend the single byte of credit each way: sends now wait for the peer to read.
                await server_stream.send_all(b"x")
                await client_stream.send_all(b"x")
                return server_stream, client_stream

            await trio.testing.check_half_closeable_stream(stream_maker, clogged_stream_maker)
            nursery.cancel_scope.cancel()


# Opening, refusing, resetting, ending.


async def test_stream_carries_target_and_data_both_ways() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await session_pair(nursery)
            server_stream, client_stream = await pair.open_stream_pair("1042")
            assert pair.acceptor is not None
            assert pair.acceptor.targets == ["1042"]
            await server_stream.send_all(b"request")
            assert await client_stream.receive_some() == b"request"
            await client_stream.send_all(b"response")
            assert await server_stream.receive_some() == b"response"
            nursery.cancel_scope.cancel()


async def test_refused_open_raises_stream_refused_error() -> None:
    async def refuse(stream: TunnelStream, target: str) -> None:
        stream.refuse(ErrorCode.REFUSED)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await session_pair(nursery, handler=refuse)
            for _ in range(2):  # a refusal ends the stream, not the session
                with pytest.raises(StreamRefusedError) as refused:
                    await pair.server.session.open_stream("1001")
                assert refused.value.code is ErrorCode.REFUSED
            assert pair.server.session.active_streams == 0
            assert not pair.server.finished.is_set()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("ending", ["transport dies", "server stops"])
async def test_session_end_breaks_pending_opens_and_open_streams(ending: str) -> None:
    async def accept_only_answer(stream: TunnelStream, target: str) -> None:
        if target == "answer":
            stream.accept()
        await trio.sleep_forever()  # "pending" is never answered

    pending_failed = trio.Event()

    async def open_pending(session: TunnelSession) -> None:
        with pytest.raises(SessionClosedError):
            await session.open_stream("pending")
        pending_failed.set()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await session_pair(nursery, handler=accept_only_answer)
            server = pair.server.session
            server_stream = await server.open_stream("answer")
            nursery.start_soon(open_pending, server)
            await trio.testing.wait_all_tasks_blocked()
            assert not pending_failed.is_set()

            if ending == "transport dies":
                await pair.client_transport.aclose()
            else:
                pair.server.cancel_scope.cancel()
            await pair.server.finished.wait()
            await pair.client.finished.wait()

            # The carrier closing is a normal end, not a failure.
            assert pair.server.error is None
            assert pair.client.error is None
            await pending_failed.wait()
            for operation in (
                server_stream.receive_some(),
                server_stream.send_all(b"x"),
                server.open_stream("later"),
            ):
                with pytest.raises(SessionClosedError):
                    await operation
            assert issubclass(SessionClosedError, trio.BrokenResourceError)
            assert server.closed.is_set()
            assert server.active_streams == 0


async def test_reset_by_peer_breaks_only_that_stream() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await session_pair(nursery)
            server_stream, client_stream = await pair.open_stream_pair()
            await client_stream.aclose()  # nothing was ended: the stream is reset
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BrokenResourceError) as broken:
                await server_stream.send_all(b"x")
            assert not isinstance(broken.value, SessionClosedError)

            other_server, other_client = await pair.open_stream_pair()
            await other_server.send_all(b"still fine")
            assert await other_client.receive_some() == b"still fine"
            nursery.cancel_scope.cancel()


async def test_failing_handler_closes_its_stream_and_the_session_survives() -> None:
    async def crash_after_accept(stream: TunnelStream, target: str) -> None:
        stream.accept()
        if target == "crash":
            raise RuntimeError("handler bug")
        await stream.send_all(b"served " + target.encode())
        await stream.send_eof()
        await stream.receive_some()  # the opener's END

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await session_pair(nursery, handler=crash_after_accept)
            crashed = await pair.server.session.open_stream("crash")
            assert await crashed.receive_some() == b""  # closed by the session, then reset
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BrokenResourceError):
                await crashed.send_all(b"x")
            served = await pair.server.session.open_stream("ok")
            assert await read_all(served) == b"served ok"
            await served.send_eof()
            assert not pair.client.finished.is_set()
            nursery.cancel_scope.cancel()


# Flow control.


async def test_unread_stream_does_not_stall_another_stream() -> None:
    size = 4 * 1024 * 1024
    data = payload(size)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await session_pair(nursery)
            stalled_server, stalled_client = await pair.open_stream_pair()
            busy_server, busy_client = await pair.open_stream_pair()
            stalled_send_done = trio.Event()

            async def flood_stalled() -> None:
                await stalled_server.send_all(b"s" * (4 * DEFAULT_WINDOW))
                stalled_send_done.set()

            nursery.start_soon(flood_stalled)
            nursery.start_soon(send_then_eof, busy_server, data)
            received = bytearray()
            while chunk := await busy_client.receive_some():
                received += chunk
                assert buffered(stalled_client) <= DEFAULT_WINDOW
            assert received == data

            await trio.testing.wait_all_tasks_blocked()
            assert buffered(stalled_client) == DEFAULT_WINDOW
            assert not stalled_send_done.is_set()
            nursery.cancel_scope.cancel()


async def test_reading_releases_a_stalled_sender() -> None:
    size = 3 * DEFAULT_WINDOW
    data = payload(size, seed=1)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await session_pair(nursery)
            server_stream, client_stream = await pair.open_stream_pair()
            nursery.start_soon(send_then_eof, server_stream, data)
            await trio.testing.wait_all_tasks_blocked()
            assert buffered(client_stream) == DEFAULT_WINDOW
            assert await read_all(client_stream) == data
            nursery.cancel_scope.cancel()


SMALL_WINDOW = 64 * 1024  # what a server offers: an unread stream costs it no more


async def test_unread_streams_cost_the_server_only_the_small_window_it_announced() -> None:
    """The attack: the client pushes on many streams nobody reads on the server. Each holds
    the server's small window, not the client's, and a stream that is read still flows."""
    data = payload(4 * DEFAULT_WINDOW, seed=8)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await session_pair(nursery, server_window=SMALL_WINDOW)
            unread = [await pair.open_stream_pair() for _ in range(8)]
            for _, client_stream in unread:
                nursery.start_soon(client_stream.send_all, bytes(4 * DEFAULT_WINDOW))
            busy_server, busy_client = await pair.open_stream_pair()
            nursery.start_soon(send_then_eof, busy_client, data)
            assert await read_all(busy_server) == data
            await trio.testing.wait_all_tasks_blocked()
            assert [buffered(server_stream) for server_stream, _ in unread] == [SMALL_WINDOW] * len(
                unread
            )
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("old_client", "old_server"), [(True, False), (False, True)], ids=["old client", "old server"]
)
async def test_an_old_peer_that_announces_no_window_still_works(
    old_client: bool, old_server: bool
) -> None:
    """It assumes DEFAULT_WINDOW both ways, so the new side grants exactly that, whatever it
    offered: full windows go both ways and nobody overruns."""
    request, response = payload(3 * DEFAULT_WINDOW, seed=9), payload(3 * DEFAULT_WINDOW, seed=10)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await session_pair(
                nursery,
                client_window=SMALL_WINDOW,
                server_window=SMALL_WINDOW,
                old_client=old_client,
                old_server=old_server,
            )
            server_stream, client_stream = await pair.open_stream_pair()
            nursery.start_soon(send_then_eof, server_stream, request)
            nursery.start_soon(send_then_eof, client_stream, response)
            await trio.testing.wait_all_tasks_blocked()
            assert buffered(client_stream) == buffered(server_stream) == DEFAULT_WINDOW
            assert await read_all(client_stream) == request
            assert await read_all(server_stream) == response
            assert pair.server.error is pair.client.error is None
            nursery.cancel_scope.cancel()


# Keepalive, in virtual time.


async def test_keepalive_detects_a_silent_peer(autojump_clock: trio.testing.MockClock) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    carrier = StallableCarrier(client_stream)
    client = TunnelSession(TunnelConnection(Role.CLIENT), carrier, ping_interval=PING)
    server = TunnelSession(
        TunnelConnection(Role.SERVER), StreamCarrier(server_stream), ping_interval=PING
    )
    with trio.fail_after(10 * PING):
        await handshake(client, server)
        carrier.stalled = True  # the server still answers; nothing reaches the client
        async with trio.open_nursery() as nursery:
            served_server = Served(server)
            await nursery.start(served_server.run)
            started = trio.current_time()
            with pytest.raises(KeepaliveTimeoutError):
                await client.serve()
            elapsed = trio.current_time() - started
            await served_server.finished.wait()
    assert 1.5 * PING < elapsed <= 2 * PING
    assert server.going_away is not None
    assert server.going_away.code is ErrorCode.TIMEOUT


async def test_keepalive_keeps_a_live_session_open(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(100 * PING):
        async with trio.open_nursery() as nursery:
            pair = await session_pair(nursery, ping_interval=PING)
            await trio.sleep(30 * PING)  # virtual time passes; both peers ping and pong
            assert not pair.client.finished.is_set()
            assert not pair.server.finished.is_set()
            # Roughly a ping and a pong per interval each way.
            for served in (pair.client, pair.server):
                assert served.session.connection.statistics().frames_received >= 40
            server_stream, client_stream = await pair.open_stream_pair()
            await server_stream.send_all(b"alive")
            assert await client_stream.receive_some() == b"alive"
            nursery.cancel_scope.cancel()


# Floods.


async def test_a_ping_flood_that_never_reads_stops_being_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Every PING queues a PONG: past MAX_REPLY_BACKLOG the server stops reading the flooder
    (whose sends then block), and the keepalive ends the session within two intervals."""
    # A socket pair: its kernel buffers fill, then a send waits for the other side to read.
    attacker_socket, server_socket = trio.socket.socketpair()
    attacker_stream, server_stream = (
        trio.SocketStream(attacker_socket),
        trio.SocketStream(server_socket),
    )
    client = TunnelSession(
        TunnelConnection(Role.CLIENT), StreamCarrier(attacker_stream), ping_interval=PING
    )
    server = TunnelSession(
        TunnelConnection(Role.SERVER), StreamCarrier(server_stream), ping_interval=PING
    )
    pings = b"".join(
        encode_header(FrameType.PING, 0, 8) + n.to_bytes(8, "big") for n in range(1024)
    )
    flood_limit = 64 * MAX_REPLY_BACKLOG  # bytes: the bounded loop of an unstoppable flood
    flooded = 0
    with trio.fail_after(TIMEOUT):
        await handshake(client, server)  # then the client is gone: the attacker never reads
        async with trio.open_nursery() as nursery:
            served = Served(server)
            await nursery.start(served.run)
            with trio.move_on_after(0.5 * PING):
                while flooded < flood_limit:
                    await attacker_stream.send_all(pings)
                    flooded += len(pings)
            backlog = server.connection.reply_backlog
            await served.finished.wait()
    one_read_of_replies = 256 * 1024  # a PONG is as long as its PING
    assert backlog <= MAX_REPLY_BACKLOG + one_read_of_replies
    assert flooded < flood_limit // 4, "the server kept reading the flood"
    assert isinstance(served.error, KeepaliveTimeoutError)


# Draining.


async def test_go_away_refuses_new_streams_and_lets_in_flight_ones_finish() -> None:
    request, response = payload(DEFAULT_WINDOW * 3, seed=2), payload(DEFAULT_WINDOW * 3, seed=3)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await session_pair(nursery)
            server = pair.server.session
            server_stream, client_stream = await pair.open_stream_pair()

            server.go_away("maintenance")
            with pytest.raises(SessionClosedError):
                await server.open_stream("1001")

            async with trio.open_nursery() as exchange:
                exchange.start_soon(send_then_eof, server_stream, request)
                exchange.start_soon(send_then_eof, client_stream, response)
                assert await read_all(client_stream) == request
                assert await read_all(server_stream) == response
            await server_stream.aclose()
            await client_stream.aclose()
            await server.wait_idle()

            going_away = pair.client.session.going_away
            assert going_away is not None
            assert going_away.code is ErrorCode.SHUTDOWN
            assert going_away.reason == "maintenance"
            assert not pair.server.finished.is_set()
            nursery.cancel_scope.cancel()


# splice.


async def test_splice_copies_both_ways_and_passes_half_closes_on() -> None:
    """The client's use: a tunnel stream spliced to a local service."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await session_pair(nursery)
            public, tunnel_end = await pair.open_stream_pair()
            local_service, local_end = trio.testing.memory_stream_pair()
            spliced = trio.Event()

            async def run_splice() -> None:
                await splice(tunnel_end, local_end)
                spliced.set()

            nursery.start_soon(run_splice)
            big = payload(2 * DEFAULT_WINDOW, seed=4)
            async with trio.open_nursery() as exchange:
                exchange.start_soon(public.send_all, big)
                received = bytearray()
                while len(received) < len(big):
                    received += await local_service.receive_some()
            assert received == big

            await public.send_eof()
            assert await local_service.receive_some() == b""  # the half-close came through
            await local_service.send_all(b"answer after the request ended")
            assert await public.receive_some() == b"answer after the request ended"
            assert not spliced.is_set()

            await local_service.send_eof()
            assert await public.receive_some() == b""
            await spliced.wait()  # both directions reached EOF
            nursery.cancel_scope.cancel()


async def test_splice_into_a_socket_keeps_order_when_the_reader_writes_directly() -> None:
    """Into a real socket the session's reader writes DATA itself while the relay waits. A
    4 KiB send buffer and small reads on the far side keep the socket filling, so bytes
    alternate between direct writes and the relay's own sends: they must arrive complete and
    in order, and be counted. (This caught a reader writing while the relay held a chunk.)"""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await session_pair(nursery)
            public, tunnel_end = await pair.open_stream_pair()
            near, far = trio.socket.socketpair()
            near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            local_end, local_service = trio.SocketStream(near), trio.SocketStream(far)
            traffic = Traffic()
            nursery.start_soon(splice, tunnel_end, local_end, traffic)
            big = payload(3 * DEFAULT_WINDOW, seed=7)
            pieces = random.Random(7)

            async def send_in_pieces() -> None:
                view = memoryview(big)
                while view:
                    size = pieces.randint(1, 16 * 1024)
                    await public.send_all(view[:size])
                    view = view[size:]
                await public.send_eof()

            nursery.start_soon(send_in_pieces)
            received = bytearray()
            while chunk := await local_service.receive_some(pieces.randint(1, 8 * 1024)):
                received += chunk
            assert received == big
            assert traffic.a_to_b == len(big)
            nursery.cancel_scope.cancel()


async def test_splice_stops_when_one_side_breaks() -> None:
    a_outer, a_inner = trio.testing.memory_stream_pair()
    b_inner, b_outer = trio.testing.memory_stream_pair()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(splice, a_inner, b_inner)
            await b_outer.aclose()  # b is gone both ways
            await a_outer.send_all(b"into the void")
        # The nursery exited: splice returned, and passed b's EOF on to a.
        assert await a_outer.receive_some() == b""


async def test_a_peer_that_grants_huge_windows_and_stops_reading_costs_the_send_queue_only() -> (
    None
):
    """The client announces the largest window (2 GiB a stream) and then stops reading: the
    server's sender of 32 MiB waits once MAX_SEND_QUEUE bytes are queued, instead of queueing
    all it was granted; the session still ends cleanly and wakes it."""
    client_stream, server_stream = trio.testing.lockstep_stream_pair()  # sends wait for reads
    carrier = StallableCarrier(client_stream)
    acceptor = Acceptor()
    client = TunnelSession(
        TunnelConnection(Role.CLIENT, offered_window=LARGEST_WINDOW),
        carrier,
        ping_interval=QUIET,
        stream_handler=acceptor,
    )
    server = TunnelSession(
        TunnelConnection(Role.SERVER), StreamCarrier(server_stream), ping_interval=QUIET
    )
    sent_all = trio.Event()
    with trio.fail_after(TIMEOUT):
        await handshake(client, server)
        async with trio.open_nursery() as nursery:
            served = [Served(client), Served(server)]
            for side in served:
                await nursery.start(side.run)
            stream = await server.open_stream(REGISTRATION_ID)
            await acceptor.streams.receive()
            carrier.stalled = True  # from now on the client reads nothing

            async def send_much() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(bytes(32 * 1024 * 1024))
                    sent_all.set()

            nursery.start_soon(send_much)
            await trio.testing.wait_all_tasks_blocked()
            assert 0 < server.connection.queued_bytes <= MAX_SEND_QUEUE
            assert server.connection.send_window(stream.stream_id) > 16 * 1024 * 1024
            assert not sent_all.is_set()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("reader_keeps_up", [True, False])
async def test_a_relay_tells_the_connection_what_its_socket_still_holds(
    reader_keeps_up: bool,
) -> None:
    """What the relay wrote into a socket whose reader is slow (here: never reads) left the
    stream as if read, but waits in the kernel's send queue: the connection reads that queue
    (``backlog_of``) before it grows the stream's window. Empty once the reader took all."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await session_pair(nursery)
            public, tunnel_end = await pair.open_stream_pair()
            service_end, relay_end = await loopback_tcp_pair()
            nursery.start_soon(splice, tunnel_end, relay_end)
            size = 4 * DEFAULT_WINDOW
            nursery.start_soon(public.send_all, bytes(size))
            if reader_keeps_up:
                received = 0
                while received < size:
                    received += len(await service_end.receive_some())
            await trio.testing.wait_all_tasks_blocked()  # all the kernel takes, it took
            backlog = pair.client.session.connection.backlog_of(tunnel_end.stream_id)
            if reader_keeps_up:
                assert backlog == 0
            else:  # the kernel's buffers take less than was sent; its send queue some of it
                assert 0 < backlog < size
            nursery.cancel_scope.cancel()
