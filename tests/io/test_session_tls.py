"""The trio driver over TLS WebSockets on loopback, as in production: what tasks queue is
sent before trio waits for I/O, and the writer task takes over when the socket is full."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing
from wsproto.events import Ping

from petit.session import TunnelSession, TunnelStream
from petit.websocket import WebSocket

from .helpers import SessionPair, session_pair

TIMEOUT = 20  # seconds bounding each test


async def _send_then_end(stream: TunnelStream, payload: bytes) -> None:
    await stream.send_all(payload)
    await stream.send_eof()


async def _read_to_end(stream: TunnelStream, into: bytearray) -> None:
    while chunk := await stream.receive_some():
        into += chunk


async def _four_streams_both_ways(pair: SessionPair, payloads: list[bytes]) -> None:
    """Open 4 streams and send ``payloads`` (8) both ways at once; each arrives whole."""
    received: list[tuple[bytearray, bytearray]] = []
    async with trio.open_nursery() as transfers:
        for index in range(4):
            server_end, client_end = await pair.open_stream_pair()
            at_client, at_server = bytearray(), bytearray()
            received.append((at_client, at_server))
            transfers.start_soon(_send_then_end, server_end, payloads[2 * index])
            transfers.start_soon(_send_then_end, client_end, payloads[2 * index + 1])
            transfers.start_soon(_read_to_end, client_end, at_client)
            transfers.start_soon(_read_to_end, server_end, at_server)
    for index, (at_client, at_server) in enumerate(received):
        assert at_client == payloads[2 * index]
        assert at_server == payloads[2 * index + 1]


async def test_streams_both_ways_arrive_whole_through_full_kernel_buffers() -> None:
    """4 KiB kernel send buffers: most sends cannot finish before the I/O wait, so the
    writer task waits for the socket; every stream's bytes still arrive whole, in order."""
    payloads = [os.urandom(700_000 + 4099 * index) for index in range(8)]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await session_pair(nursery, over_tls=True, send_buffer=4096)
            await _four_streams_both_ways(pair, payloads)
            nursery.cancel_scope.cancel()


async def test_small_round_trips_are_sent_without_waking_the_writer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each message goes out at the I/O wait after the batch that queued it: the writer
    task never sends (two trips through the scheduler saved per message)."""
    writer_sends = 0
    send_queued_now = TunnelSession._send_queued_now

    async def counted(session: TunnelSession) -> None:
        nonlocal writer_sends
        writer_sends += 1
        await send_queued_now(session)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await session_pair(nursery, over_tls=True)
            monkeypatch.setattr(TunnelSession, "_send_queued_now", counted)
            server_end, client_end = await pair.open_stream_pair()
            for round_trip in range(100):
                request = b"GET %d\r\n" % round_trip
                await server_end.send_all(request)
                assert await client_end.receive_some() == request
                await client_end.send_all(b"+OK " + request)
                assert await server_end.receive_some() == b"+OK " + request
            assert writer_sends == 0
            nursery.cancel_scope.cancel()


async def test_streams_arrive_whole_while_the_peer_pings() -> None:
    """The reader answers a WebSocket PING itself; while its PONG waits for a full socket,
    the writer task may park holding a framed message. Nothing may be sent before that
    message: every stream's bytes still arrive whole and in order."""
    payloads = [os.urandom(500_000 + 4099 * index) for index in range(8)]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await session_pair(nursery, over_tls=True, send_buffer=4096)
            client_websocket = pair.client.session._carrier
            assert isinstance(client_websocket, WebSocket)
            done = trio.Event()

            async def ping_the_server() -> None:
                while not done.is_set():
                    await client_websocket._write(
                        client_websocket._connection.send(Ping(payload=os.urandom(100)))
                    )
                    await trio.sleep(0)

            nursery.start_soon(ping_the_server)
            await _four_streams_both_ways(pair, payloads)
            done.set()
            nursery.cancel_scope.cancel()


async def test_nothing_overtakes_a_message_the_parked_writer_holds() -> None:
    """The exact interleaving behind the test above, step by step: another task is writing
    (as the reader does with a PONG), so the writer takes message A and parks; the other
    write ends in the same batch in which a stream queues B. B must not go out before A."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await session_pair(nursery, over_tls=True)
            server_end, client_end = await pair.open_stream_pair()
            websocket = pair.server.session._carrier
            assert isinstance(websocket, WebSocket)
            websocket._writing = True  # another task's write is in progress
            assert server_end.send_nowait(b"A" * 10) == 10
            await trio.testing.wait_all_tasks_blocked()
            assert len(websocket._written) == 1, "the writer holds A, parked behind that write"
            assert server_end.send_nowait(b"B" * 10) == 10
            websocket._writing = False  # that write ends in this same batch
            websocket._written.unpark()
            received = b""
            while len(received) < 20:
                received += await client_end.receive_some()
            assert received == b"A" * 10 + b"B" * 10
            nursery.cancel_scope.cancel()
