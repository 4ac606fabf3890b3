"""petit.tlsio: TLS driven straight over a socket, after trio's SSLStream did the handshake."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from petit.tlsio import TlsSocket

from .helpers import loopback_tcp_pair, tls_contexts


@asynccontextmanager
async def tls_pair(
    send_buffer: int | None = None,
) -> AsyncIterator[tuple[trio.SSLStream[trio.SocketStream], trio.SSLStream[trio.SocketStream]]]:
    """(client, server) TLS streams over loopback TCP, handshaken; ``send_buffer`` shrinks
    the kernel send buffers."""
    server_context, client_context = tls_contexts()
    client_tcp, server_tcp = await loopback_tcp_pair(send_buffer)
    client = trio.SSLStream(client_tcp, client_context, server_hostname="localhost")
    server = trio.SSLStream(server_tcp, server_context, server_side=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    try:
        yield client, server
    finally:
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)


async def test_only_a_handshaken_tls_stream_over_a_socket_is_taken_over() -> None:
    left, _ = trio.testing.memory_stream_pair()
    assert TlsSocket.take_over(left) is None
    server_context, _ = tls_contexts()
    tcp_left, _tcp_right = trio.testing.memory_stream_pair()
    assert TlsSocket.take_over(trio.SSLStream(tcp_left, server_context, server_side=True)) is None
    async with tls_pair() as (client, server):
        assert TlsSocket.take_over(client) is not None
        assert TlsSocket.take_over(server) is not None


async def test_a_server_taken_over_right_after_its_handshake_may_speak_first() -> None:
    """trio holds a TLS 1.3 server's session tickets until its first send; taken over before
    any, the server must still send them ahead of its first record (it used not to: the
    client then failed with a bad record MAC)."""
    async with tls_pair() as (client, server):
        assert server._ssl_object.version() == "TLSv1.3"
        sender, receiver = TlsSocket.take_over(server), TlsSocket.take_over(client)
        assert sender is not None
        assert receiver is not None
        assert sender.send_nowait(b"hello")
        with trio.fail_after(5):
            assert await receiver.receive_some(100) == b"hello"
        assert receiver.send_nowait(b"hi")
        with trio.fail_after(5):
            assert await sender.receive_some(100) == b"hi"


async def test_bytes_keep_their_order_through_a_full_kernel_buffer() -> None:
    """Sends the kernel refuses wait in the backlog in order; small and large messages mix."""
    async with tls_pair(send_buffer=4096) as (client, server):
        sender, receiver = TlsSocket.take_over(client), TlsSocket.take_over(server)
        assert sender is not None
        assert receiver is not None
        payload = os.urandom(1024 * 1024)
        sizes = [1, 7, 100, 4096, 70_000, 300_000]
        received = bytearray()
        refused = 0

        async def send() -> None:
            nonlocal refused
            offset, turn = 0, 0
            while offset < len(payload):
                size = sizes[turn % len(sizes)]
                turn += 1
                if not sender.send_nowait(payload[offset : offset + size]):
                    assert sender.backlog
                    refused += 1
                offset += size
                if turn % 5 == 0:
                    await sender.flush()
                    assert not sender.backlog
            await sender.send_all(b"")
            await sender.flush()

        async def receive() -> None:
            while len(received) < len(payload):
                received.extend(await receiver.receive_some(65536))
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(receive)
        assert bytes(received) == payload
        assert refused  # the backlog was used


async def test_the_peer_closing_reads_as_end_of_data() -> None:
    async with tls_pair() as (client, server):
        receiver = TlsSocket.take_over(server)
        assert receiver is not None
        await client.send_all(b"last words")
        await client.transport_stream.aclose()
        assert await receiver.receive_some(100) == b"last words"
        assert await receiver.receive_some(100) == b""


async def test_a_closed_socket_refuses_sends_and_receives() -> None:
    async with tls_pair() as (client, _server):
        sender = TlsSocket.take_over(client)
        assert sender is not None
        await client.transport_stream.aclose()
        with pytest.raises(trio.ClosedResourceError):
            sender.send_nowait(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await sender.receive_some(10)
