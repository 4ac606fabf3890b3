"""petit.sockio: a socket's reads and writes without trio's per-call machinery."""

from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.testing

from petit import sockio

from .helpers import loopback_tcp_pair

TIMEOUT = 10  # seconds bounding each test


async def test_a_receive_waits_for_the_bytes_and_a_send_waits_for_room() -> None:
    """Through a 4 KiB kernel send buffer, 2 MiB sent in one call arrive whole, in order."""
    with trio.fail_after(TIMEOUT):
        client, server = await loopback_tcp_pair()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        payload = os.urandom(2 * 1024 * 1024)
        received = bytearray()

        async def read_all() -> None:
            while len(received) < len(payload):
                received.extend(await sockio.receive(server, 65536))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await sockio.send(client, payload)
        assert received == payload
        await client.aclose()
        assert await sockio.receive(server, 100) == b""  # the peer's FIN
        await server.aclose()


async def test_a_reset_connection_is_broken_and_a_closed_one_is_closed() -> None:
    with trio.fail_after(TIMEOUT):
        client, server = await loopback_tcp_pair()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        await client.aclose()  # linger 0: an RST
        with pytest.raises(trio.BrokenResourceError):
            await sockio.receive(server, 100)
        await server.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await sockio.send(server, b"late")
        with pytest.raises(trio.ClosedResourceError):
            await sockio.receive(server, 100)


async def test_other_streams_use_their_own_methods() -> None:
    with trio.fail_after(TIMEOUT):
        left, right = trio.testing.memory_stream_pair()
        await sockio.send(left, b"through memory")
        assert await sockio.receive(right, 100) == b"through memory"
