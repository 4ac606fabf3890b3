"""petit's WebSocket over in-memory streams: upgrade, byte-stream receive, limits, closing."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing
from hypothesis import given, strategies as st
from wsproto import ConnectionType, WSConnection, frame_protocol
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
)
from wsproto.frame_protocol import FrameProtocol

from petit.errors import RemoteProtocolError
from petit.websocket import (
    MAX_CONTROL_MESSAGE,
    RECEIVE_BUFFER,
    HandshakeError,
    WebSocket,
    WebSocketClosedError,
    _CMasker,
    connect,
    read_upgrade,
)

TIMEOUT = 10  # seconds bounding each test


async def websocket_pair() -> tuple[WebSocket, WebSocket]:
    """(client, server) after a real upgrade over an in-memory stream pair."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        accepted: list[WebSocket] = []

        async def serve() -> None:
            request = await read_upgrade(server_stream, "memory")
            assert request is not None
            assert request.path == "/petit/v1"
            accepted.append(await request.accept())

        nursery.start_soon(serve)
        client = await connect(client_stream, "example.test:3014", "/petit/v1")
    return client, accepted[0]


class RawPeer:
    """The other end spoken by wsproto directly, to send what petit's side never would."""

    def __init__(self, stream: trio.abc.Stream, connection: WSConnection) -> None:
        self.stream = stream
        self.connection = connection

    @classmethod
    async def upgraded_client(cls) -> tuple[RawPeer, WebSocket]:
        """(raw client, petit server) after a real upgrade."""
        client_stream, server_stream = trio.testing.memory_stream_pair()
        connection = WSConnection(ConnectionType.CLIENT)
        await client_stream.send_all(connection.send(Request(host="x", target="/")))
        request = await read_upgrade(server_stream, "memory")
        assert request is not None
        server = await request.accept()
        peer = cls(client_stream, connection)
        assert isinstance(await peer.next_event(), AcceptConnection)
        return peer, server

    async def next_event(self) -> object:
        while True:
            for event in self.connection.events():
                return event
            self.connection.receive_data(bytes(await self.stream.receive_some()))


async def test_binary_messages_travel_both_ways() -> None:
    with trio.fail_after(TIMEOUT):
        client, server = await websocket_pair()
        await client.send(b"from the client")
        assert await server.receive() == b"from the client"
        await server.send(b"from the server")
        assert await client.receive() == b"from the server"


async def test_receive_hands_over_parts_of_a_message_as_they_arrive() -> None:
    """The tunnel is a byte stream: a big message is not held back until it is whole."""
    with trio.fail_after(TIMEOUT):
        client, server = await websocket_pair()
        payload = os.urandom(4 * RECEIVE_BUFFER)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send, payload)
            received = bytearray()
            sizes = []
            while len(received) < len(payload):
                chunk = await server.receive()
                sizes.append(len(chunk))
                received += chunk
        assert received == payload
        assert max(sizes) <= RECEIVE_BUFFER
        assert len(sizes) > 1


async def test_get_message_returns_whole_messages_text_as_utf8() -> None:
    with trio.fail_after(TIMEOUT):
        client, server = await websocket_pair()
        await client.send_message('{"type": "register", "name": "é"}')
        await client.send_message(b"second")
        assert await server.get_message() == '{"type": "register", "name": "é"}'.encode()
        assert await server.get_message() == b"second"


async def test_a_message_over_the_limit_is_refused_with_1009() -> None:
    with trio.fail_after(TIMEOUT):
        client, server = await websocket_pair()
        await client.send_message(b"x" * (MAX_CONTROL_MESSAGE + 1))
        with pytest.raises(RemoteProtocolError, match="over 65536 bytes"):
            await server.get_message()
        assert await client.receive() == b""
        with pytest.raises(WebSocketClosedError, match="1009"):
            await client.get_message()


async def test_the_tunnel_refuses_text_messages() -> None:
    with trio.fail_after(TIMEOUT):
        client, server = await websocket_pair()
        await client.send_message("text")
        with pytest.raises(RemoteProtocolError, match="text WebSocket message"):
            await server.receive()
        with pytest.raises(WebSocketClosedError, match="1003"):
            await client.get_message()


async def test_closing_is_a_handshake_and_reads_as_end_of_data() -> None:
    with trio.fail_after(TIMEOUT):
        client, server = await websocket_pair()
        await client.send(b"last")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.aclose)
            assert await server.receive() == b"last"
            assert await server.receive() == b""  # the close frame, answered
        with pytest.raises(WebSocketClosedError, match="closed by the peer"):
            await server.send(b"too late")
        await server.aclose()


async def test_close_waits_for_the_peer_a_bounded_time() -> None:
    """A peer that never answers our close frame costs at most CLOSE_WAIT."""
    with trio.fail_after(TIMEOUT):
        peer, server = await RawPeer.upgraded_client()
        await server.aclose()  # the raw client never answers
        event = await peer.next_event()
    assert isinstance(event, CloseConnection)
    assert event.code == 1000


async def test_pings_are_answered_by_the_reader() -> None:
    with trio.fail_after(TIMEOUT):
        peer, server = await RawPeer.upgraded_client()
        await peer.stream.send_all(
            peer.connection.send(Ping(payload=b"are you there"))
            + peer.connection.send(BytesMessage(data=b"data after the ping"))
        )
        assert await server.receive() == b"data after the ping"
        assert await peer.next_event() == Pong(payload=b"are you there")


async def test_a_peer_that_breaks_rfc6455_gets_1002_and_an_error() -> None:
    """A client must mask its frames; an unmasked one is a protocol error."""
    with trio.fail_after(TIMEOUT):
        peer, server = await RawPeer.upgraded_client()
        unmasked = FrameProtocol(client=False, extensions=[]).send_data(b"unmasked", True)
        await peer.stream.send_all(unmasked)
        with pytest.raises(RemoteProtocolError, match="broke the WebSocket protocol"):
            await server.receive()
        event = await peer.next_event()
        assert isinstance(event, CloseConnection)
        assert event.code == 1002


async def test_a_refused_upgrade_names_the_status() -> None:
    with trio.fail_after(TIMEOUT):
        client_stream, server_stream = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:

            async def refuse() -> None:
                request = await read_upgrade(server_stream, "memory")
                assert request is not None
                await request.reject(404)

            nursery.start_soon(refuse)
            with pytest.raises(HandshakeError, match="answered 404"):
                await connect(client_stream, "x", "/elsewhere")


async def test_a_plain_http_request_gets_an_error_answer_not_an_upgrade() -> None:
    with trio.fail_after(TIMEOUT):
        client_stream, server_stream = trio.testing.memory_stream_pair()
        await client_stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await read_upgrade(server_stream, "memory") is None
        answer = await client_stream.receive_some()
        assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 426 ")), answer


def _xor(data: bytes, key: bytes, offset: int) -> bytes:
    """RFC 6455 5.3, byte by byte: the reference for the C masker."""
    return bytes(byte ^ key[(offset + index) % 4] for index, byte in enumerate(data))


@given(data=st.binary(max_size=3000), key=st.binary(min_size=4, max_size=4), cuts=st.data())
def test_the_c_masker_is_rfc6455_masking_across_any_pieces(
    data: bytes, key: bytes, cuts: st.DataObject
) -> None:
    """A frame's payload may reach the masker in pieces (a partial read): each piece goes on
    with the key byte where the previous one stopped."""
    points = sorted(cuts.draw(st.lists(st.integers(0, len(data)), max_size=6)))
    masker = _CMasker(key)
    pieces = [
        data[start:end] for start, end in zip([0, *points], [*points, len(data)], strict=True)
    ]
    assert b"".join(masker.process(piece) for piece in pieces) == _xor(data, key, 0)


def test_wsproto_masks_and_unmasks_with_the_c_masker() -> None:
    """The swap is in place (a wsproto that renamed its masker would fail here), and a masked
    frame wsproto builds with it is unmasked by wsproto to the same bytes."""
    assert getattr(frame_protocol, "XorMaskerSimple", None) is _CMasker
    payload = os.urandom(70_001)
    client = FrameProtocol(client=True, extensions=[])
    server = FrameProtocol(client=False, extensions=[])
    wire = client.send_data(payload, True)
    key = bytes(wire[10:14])  # after the 2-byte header and the 8-byte length
    assert bytes(wire[14:]) == _xor(payload, key, 0)
    server.receive_bytes(bytes(wire))
    frames = list(server.received_frames())
    assert (
        b"".join(frame.payload for frame in frames if isinstance(frame.payload, bytes)) == payload
    )
    assert len(frames) == 1
