"""TunnelConnection driven by hand: handshake, streams, flow control, what the peer may not do."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from petit.connection import (
    DEFAULT_WINDOW,
    MAX_WINDOW,
    WINDOW_GROWTH_BUDGET,
    ConnectionState,
    Role,
    StreamKind,
    StreamState,
    TunnelConnection,
    split_target,
    stream_target,
)
from petit.errors import (
    ErrorCode,
    FlowControlError,
    LocalProtocolError,
    RemoteProtocolError,
)
from petit.events import (
    ConnectionTerminated,
    DataReceived,
    GoAwayReceived,
    HelloReceived,
    PingReceived,
    PongReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from petit.flow import LARGEST_WINDOW
from petit.frames import Frame, FrameType, decode_all, encode_frame

from .helpers import HELLO, NONCE, WELCOME, ConnectionPair, inject, sent_frames


def u32(value: int) -> bytes:
    return struct.pack("!I", value)


def goaway(code: ErrorCode, reason: bytes = b"") -> Frame:
    return Frame(FrameType.GOAWAY, 0, u32(code) + reason)


def assert_failed_with(connection: TunnelConnection, code: ErrorCode) -> None:
    """The connection is CLOSED and its last queued frame is a GOAWAY carrying ``code``."""
    assert connection.state is ConnectionState.CLOSED
    last = sent_frames(connection)[-1]
    assert last.type is FrameType.GOAWAY
    assert last.payload[:4] == u32(code)


# Handshake.


def test_handshake_states() -> None:
    pair = ConnectionPair(handshake=False)
    steps: list[Callable[[], object]] = [
        lambda: pair.server.send_challenge(NONCE),
        lambda: pair.deliver(to=Role.CLIENT),
        lambda: pair.client.send_hello(HELLO),
        lambda: pair.deliver(to=Role.SERVER),
        lambda: pair.server.send_welcome(b"{}"),
        lambda: pair.deliver(to=Role.CLIENT),
    ]
    states = [(pair.server.state, pair.client.state)]
    for step in steps:
        step()
        states.append((pair.server.state, pair.client.state))
    assert (pair.server.role, pair.client.role) == (Role.SERVER, Role.CLIENT)
    assert [(server.name, client.name) for server, client in states] == [
        ("START", "AWAITING_CHALLENGE"),
        ("AWAITING_HELLO", "AWAITING_CHALLENGE"),
        ("AWAITING_HELLO", "SIGNING"),
        ("AWAITING_HELLO", "AWAITING_WELCOME"),
        ("VERIFYING", "AWAITING_WELCOME"),
        ("OPEN", "AWAITING_WELCOME"),
        ("OPEN", "OPEN"),
    ]


def test_hello_before_the_challenge_is_our_bug() -> None:
    pair = ConnectionPair(handshake=False)
    with pytest.raises(LocalProtocolError):
        pair.client.send_hello(HELLO)
    with pytest.raises(LocalProtocolError):
        pair.server.send_welcome(b"{}")
    with pytest.raises(LocalProtocolError):
        pair.client.send_challenge(NONCE)


@pytest.mark.parametrize("nonce_size", [15, 65])
def test_challenge_nonce_size_is_checked_before_anything_changes(nonce_size: int) -> None:
    server = TunnelConnection(Role.SERVER)
    with pytest.raises(LocalProtocolError):
        server.send_challenge(bytes(nonce_size))
    assert server.state is ConnectionState.START
    assert server.data_to_send() == b""


@pytest.mark.parametrize("nonce_size", [15, 65])
def test_peer_challenge_nonce_size_is_checked(nonce_size: int) -> None:
    client = TunnelConnection(Role.CLIENT)
    with pytest.raises(RemoteProtocolError):
        inject(client, Frame(FrameType.CHALLENGE, 0, bytes(nonce_size)))
    assert_failed_with(client, ErrorCode.FRAME_SIZE)


def test_second_hello_is_refused() -> None:
    pair = ConnectionPair(handshake=False)
    pair.server.send_challenge(NONCE)
    pair.deliver(to=Role.CLIENT)
    pair.client.send_hello(HELLO)
    assert pair.deliver(to=Role.SERVER) == [HelloReceived(HELLO)]
    with pytest.raises(RemoteProtocolError):
        inject(pair.server, Frame(FrameType.HELLO, 0, HELLO))
    assert_failed_with(pair.server, ErrorCode.AUTH)


@pytest.mark.parametrize(
    "frame",
    [
        Frame(FrameType.OPEN, 1, b"reg-1"),
        Frame(FrameType.ACCEPT, 1),
        Frame(FrameType.DATA, 1, b"x"),
        Frame(FrameType.END, 1),
        Frame(FrameType.RESET, 1, u32(ErrorCode.CANCEL)),
        Frame(FrameType.WINDOW_UPDATE, 1, u32(1)),
        Frame(FrameType.PING, 0, bytes(8)),
        Frame(FrameType.PONG, 0, bytes(8)),
    ],
    ids=lambda frame: frame.type.name,
)
@pytest.mark.parametrize("receiver", [Role.SERVER, Role.CLIENT])
def test_session_frames_before_the_handshake_are_refused(frame: Frame, receiver: Role) -> None:
    pair = ConnectionPair(handshake=False)
    pair.server.send_challenge(NONCE)
    pair.deliver(to=Role.CLIENT)  # the server awaits the hello, the client must sign
    connection = pair.connection(receiver)
    connection.data_to_send()
    with pytest.raises(RemoteProtocolError) as info:
        inject(connection, frame)
    assert info.value.code is ErrorCode.AUTH
    assert_failed_with(connection, ErrorCode.AUTH)


def test_goaway_before_open_closes_and_ignores_what_follows() -> None:
    pair = ConnectionPair(handshake=False)
    pair.server.send_challenge(NONCE)
    pair.deliver(to=Role.CLIENT)
    pair.client.send_hello(HELLO)
    pair.deliver(to=Role.SERVER)
    pair.server.close(ErrorCode.AUTH, "unknown key")
    assert pair.server.state is ConnectionState.CLOSED
    pair.server.data_to_send()  # replaced below by a GOAWAY followed by junk
    events = inject(pair.client, goaway(ErrorCode.AUTH, b"unknown key"), Frame(FrameType.END, 1))
    assert events == [GoAwayReceived(ErrorCode.AUTH, "unknown key")]
    assert pair.client.state is ConnectionState.CLOSED
    assert pair.client.receive_data(b"") == []


# Streams.


def test_open_accept_data_end_both_ways() -> None:
    pair = ConnectionPair()
    stream_id = pair.open_stream("reg-1")
    assert stream_id == 1
    assert pair.server.send_data(stream_id, b"request") == 7
    assert pair.deliver(to=Role.CLIENT) == [DataReceived(stream_id, b"request")]
    assert pair.client.send_data(stream_id, memoryview(b"response")) == 8
    pair.client.end_stream(stream_id)
    assert pair.deliver(to=Role.SERVER) == [
        DataReceived(stream_id, b"response"),
        StreamEnded(stream_id),
    ]
    pair.server.end_stream(stream_id)
    assert pair.deliver(to=Role.CLIENT) == [StreamEnded(stream_id)]
    assert pair.server.stream_ids() == pair.client.stream_ids() == ()


def test_stream_ids_run_out_at_the_u32_limit() -> None:
    pair = ConnectionPair()
    pair.server._highest_stream_id = 2**32 - 1  # opening 2**31 streams for real takes too long
    with pytest.raises(LocalProtocolError, match="exhausted"):
        pair.server.open_stream("reg-1")


def test_stream_ids_are_odd_and_increasing() -> None:
    pair = ConnectionPair()
    assert [pair.server.open_stream("r") for _ in range(3)] == [1, 3, 5]
    assert pair.deliver(to=Role.CLIENT) == [StreamOpened(n, "r") for n in (1, 3, 5)]
    assert pair.client.stream_ids() == (1, 3, 5)


def test_half_close_states() -> None:
    pair = ConnectionPair()
    stream_id = pair.open_stream()
    pair.server.end_stream(stream_id)
    pair.deliver(to=Role.CLIENT)
    assert pair.server.stream_state(stream_id) is StreamState.HALF_CLOSED_LOCAL
    assert pair.client.stream_state(stream_id) is StreamState.HALF_CLOSED_REMOTE
    with pytest.raises(LocalProtocolError):
        pair.server.send_data(stream_id, b"late")
    assert pair.client.send_data(stream_id, b"still flowing") == 13
    assert pair.deliver(to=Role.SERVER) == [DataReceived(stream_id, b"still flowing")]
    pair.client.end_stream(stream_id)
    assert pair.client.stream_state(stream_id) is StreamState.CLOSED
    pair.deliver(to=Role.SERVER)
    assert pair.server.stream_state(stream_id) is StreamState.CLOSED


def test_data_after_the_peer_ended_is_refused() -> None:
    pair = ConnectionPair()
    stream_id = pair.open_stream()
    pair.client.end_stream(stream_id)
    pair.deliver(to=Role.SERVER)
    with pytest.raises(RemoteProtocolError):
        inject(pair.server, Frame(FrameType.DATA, stream_id, b"late"))
    assert_failed_with(pair.server, ErrorCode.STREAM_CLOSED)


def test_data_before_accept_is_refused_both_ways() -> None:
    pair = ConnectionPair()
    stream_id = pair.server.open_stream("reg-1")
    pair.deliver(to=Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        pair.server.send_data(stream_id, b"too early")
    with pytest.raises(RemoteProtocolError):
        inject(pair.client, Frame(FrameType.DATA, stream_id, b"too early"))


@pytest.mark.parametrize("resetter", [Role.SERVER, Role.CLIENT])
def test_reset_closes_the_stream_on_both_sides(resetter: Role) -> None:
    pair = ConnectionPair()
    stream_id = pair.open_stream()
    pair.connection(resetter).reset_stream(stream_id, ErrorCode.REFUSED)
    peer = Role.CLIENT if resetter is Role.SERVER else Role.SERVER
    assert pair.deliver(to=peer) == [StreamReset(stream_id, ErrorCode.REFUSED)]
    assert pair.server.stream_ids() == pair.client.stream_ids() == ()
    pair.connection(resetter).reset_stream(stream_id)  # already gone: a no-op
    pair.connection(peer).reset_stream(stream_id)
    assert pair.server.data_to_send() == pair.client.data_to_send() == b""


def test_client_may_refuse_an_open_stream() -> None:
    pair = ConnectionPair()
    stream_id = pair.server.open_stream("reg-1")
    pair.deliver(to=Role.CLIENT)
    pair.client.reset_stream(stream_id, ErrorCode.REFUSED)
    assert pair.deliver(to=Role.SERVER) == [StreamReset(stream_id, ErrorCode.REFUSED)]


def test_unknown_reset_code_becomes_protocol() -> None:
    pair = ConnectionPair()
    stream_id = pair.open_stream()
    assert inject(pair.client, Frame(FrameType.RESET, stream_id, u32(999))) == [
        StreamReset(stream_id, ErrorCode.PROTOCOL)
    ]


@pytest.mark.parametrize(
    "frame",
    [
        Frame(FrameType.DATA, 1, b"racing"),
        Frame(FrameType.END, 1),
        Frame(FrameType.WINDOW_UPDATE, 1, u32(10)),
        Frame(FrameType.RESET, 1, u32(ErrorCode.CANCEL)),
        Frame(FrameType.ACCEPT, 1),
    ],
    ids=lambda frame: frame.type.name,
)
def test_frames_racing_a_reset_are_ignored(frame: Frame) -> None:
    pair = ConnectionPair()
    stream_id = pair.open_stream()
    pair.server.reset_stream(stream_id)
    pair.server.data_to_send()
    assert inject(pair.server, frame) == []
    assert pair.server.state is ConnectionState.OPEN
    assert pair.server.data_to_send() == b""


def test_never_opened_streams_are_refused() -> None:
    pair = ConnectionPair()
    pair.open_stream()
    with pytest.raises(RemoteProtocolError, match="stream 3 was never opened") as info:
        inject(pair.server, Frame(FrameType.DATA, 3, b"x"))
    assert info.value.code is ErrorCode.STREAM_CLOSED
    assert_failed_with(pair.server, ErrorCode.STREAM_CLOSED)


def test_even_stream_ids_were_never_opened() -> None:
    pair = ConnectionPair()
    pair.open_stream()
    pair.open_stream()
    with pytest.raises(RemoteProtocolError, match="stream 2 was never opened"):
        inject(pair.client, Frame(FrameType.END, 2))


def test_local_commands_on_unknown_streams_are_our_bug() -> None:
    pair = ConnectionPair()
    with pytest.raises(LocalProtocolError):
        pair.server.reset_stream(1)
    with pytest.raises(LocalProtocolError):
        pair.client.acknowledge_received_data(1, 1)
    with pytest.raises(LocalProtocolError):
        pair.server.send_data(1, b"x")
    with pytest.raises(LocalProtocolError):
        pair.server.send_window(1)


def test_client_may_not_open_streams() -> None:
    pair = ConnectionPair()
    with pytest.raises(LocalProtocolError, match="only the server may send OPEN"):
        pair.client.open_stream("reg-1")
    with pytest.raises(RemoteProtocolError, match="only the server may send OPEN"):
        inject(pair.server, Frame(FrameType.OPEN, 1, b"reg-1"))
    assert_failed_with(pair.server, ErrorCode.PROTOCOL)


def test_server_may_not_accept() -> None:
    pair = ConnectionPair()
    stream_id = pair.server.open_stream("reg-1")
    with pytest.raises(LocalProtocolError):
        pair.server.accept_stream(stream_id)
    pair.deliver(to=Role.CLIENT)
    with pytest.raises(RemoteProtocolError):
        inject(pair.client, Frame(FrameType.ACCEPT, stream_id))


@pytest.mark.parametrize("stream_id", [0, 2, 1])
def test_open_ids_must_be_odd_and_new(stream_id: int) -> None:
    pair = ConnectionPair()
    pair.open_stream()
    with pytest.raises(RemoteProtocolError):
        inject(pair.client, Frame(FrameType.OPEN, stream_id, b"reg-1"))


@pytest.mark.parametrize("target", [b"", b"x" * 65, b"\xff\xfe"])
def test_open_target_must_be_1_to_64_bytes_of_utf8(target: bytes) -> None:
    pair = ConnectionPair()
    with pytest.raises(RemoteProtocolError):
        inject(pair.client, Frame(FrameType.OPEN, 1, target))


@pytest.mark.parametrize("target", ["", "x" * 65])
def test_local_open_target_size_is_checked(target: str) -> None:
    pair = ConnectionPair()
    with pytest.raises(LocalProtocolError):
        pair.server.open_stream(target)
    assert pair.server.stream_ids() == ()


def test_a_64_byte_target_of_multibyte_characters_fits() -> None:
    pair = ConnectionPair()
    stream_id = pair.server.open_stream("é" * 32)
    assert pair.deliver(to=Role.CLIENT) == [StreamOpened(stream_id, "é" * 32)]


@pytest.mark.parametrize(
    "frame",
    [
        Frame(FrameType.PING, 0, bytes(7)),
        Frame(FrameType.PONG, 0, bytes(9)),
        Frame(FrameType.RESET, 1, bytes(3)),
        Frame(FrameType.WINDOW_UPDATE, 1, bytes(5)),
        Frame(FrameType.END, 1, b"x"),
        Frame(FrameType.DATA, 1, b""),
        Frame(FrameType.GOAWAY, 0, bytes(3)),
    ],
    ids=lambda frame: frame.type.name,
)
def test_payload_sizes_are_checked(frame: Frame) -> None:
    pair = ConnectionPair()
    pair.open_stream()
    with pytest.raises(RemoteProtocolError) as info:
        inject(pair.client, frame)
    assert info.value.code is ErrorCode.FRAME_SIZE


@pytest.mark.parametrize("stream_id", [0, 1])
def test_frames_on_the_wrong_kind_of_stream_are_refused(stream_id: int) -> None:
    pair = ConnectionPair()
    pair.open_stream()
    frame_type = FrameType.PING if stream_id else FrameType.DATA
    with pytest.raises(RemoteProtocolError, match=f"on stream {stream_id}"):
        inject(pair.client, Frame(frame_type, stream_id, bytes(8)))


# Flow control.


def test_send_data_is_split_into_frames_and_capped_by_the_window() -> None:
    pair = ConnectionPair(client_window=1000, server_window=1000, max_payload=300)
    stream_id = pair.open_stream()
    assert pair.server.send_data(stream_id, bytes(range(250)) * 5) == 1000
    frames = sent_frames(pair.server)
    assert [len(frame.payload) for frame in frames] == [300, 300, 300, 100]
    assert b"".join(frame.payload for frame in frames) == (bytes(range(250)) * 5)[:1000]
    assert pair.server.send_window(stream_id) == 0
    assert pair.server.send_data(stream_id, b"more") == 0
    assert pair.server.data_to_send() == b""


def test_data_to_send_with_a_limit_cuts_at_frame_boundaries() -> None:
    pair = ConnectionPair(max_payload=300)
    stream_id = pair.open_stream()
    pair.server.send_data(stream_id, bytes(1000))  # frames of 312, 312, 312 and 112 bytes
    pair.server.ping(bytes(8))  # 20 bytes
    messages = []
    while message := pair.server.data_to_send(max_bytes=700):
        messages.append(message)
    assert [len(message) for message in messages] == [624, 444]
    frames = [frame for message in messages for frame in decode_all(message)]
    assert [frame.type for frame in frames] == [FrameType.DATA] * 4 + [FrameType.PING]
    pair.server.ping(bytes(8))
    pair.server.send_data(stream_id, bytes(250))
    assert len(pair.server.data_to_send(max_bytes=10)) == 20  # always at least one frame


def test_data_sent_from_a_reusable_buffer_is_copied_when_queued() -> None:
    pair = ConnectionPair()
    stream_id = pair.open_stream()
    buffer = bytearray(b"first")
    pair.server.send_data(stream_id, memoryview(buffer))
    buffer[:] = b"later"  # the caller reuses its buffer before the writer ran
    assert pair.deliver(to=Role.CLIENT) == [DataReceived(stream_id, b"first")]


def test_window_update_resumes_sending() -> None:
    pair = ConnectionPair(client_window=100, server_window=100)
    stream_id = pair.open_stream()
    assert pair.server.send_data(stream_id, bytes(150)) == 100
    assert pair.deliver(to=Role.CLIENT) == [DataReceived(stream_id, bytes(100))]
    assert pair.server.send_data(stream_id, bytes(50)) == 0
    pair.client.acknowledge_received_data(stream_id, 30)  # the sender is blocked: no batching
    assert pair.deliver(to=Role.SERVER) == [WindowUpdated(stream_id, 30)]
    assert pair.server.send_window(stream_id) == 30
    assert pair.server.send_data(stream_id, bytes(50)) == 30


def test_window_updates_are_batched() -> None:
    pair = ConnectionPair(client_window=100, server_window=100)
    stream_id = pair.open_stream()
    pair.server.send_data(stream_id, bytes(60))
    pair.deliver(to=Role.CLIENT)
    pair.client.acknowledge_received_data(stream_id, 40)
    assert pair.deliver(to=Role.SERVER) == []  # less than half the window
    pair.client.acknowledge_received_data(stream_id, 10)
    assert pair.deliver(to=Role.SERVER) == [WindowUpdated(stream_id, 50)]
    assert pair.server.send_window(stream_id) == 90


def test_data_beyond_the_window_is_fatal() -> None:
    pair = ConnectionPair(client_window=100, server_window=100)
    stream_id = pair.open_stream()
    inject(pair.client, Frame(FrameType.DATA, stream_id, bytes(100)))
    with pytest.raises(FlowControlError):
        inject(pair.client, Frame(FrameType.DATA, stream_id, b"x"))
    assert_failed_with(pair.client, ErrorCode.FLOW_CONTROL)


@pytest.mark.parametrize("delta", [0, LARGEST_WINDOW])
def test_bad_window_updates_are_fatal(delta: int) -> None:
    pair = ConnectionPair()
    stream_id = pair.open_stream()
    with pytest.raises(FlowControlError):
        inject(pair.server, Frame(FrameType.WINDOW_UPDATE, stream_id, u32(delta)))
    assert_failed_with(pair.server, ErrorCode.FLOW_CONTROL)


def test_acknowledging_a_gone_stream_is_a_noop() -> None:
    pair = ConnectionPair()
    stream_id = pair.open_stream()
    pair.server.send_data(stream_id, bytes(DEFAULT_WINDOW // 2))
    pair.deliver(to=Role.CLIENT)
    pair.server.reset_stream(stream_id)
    pair.deliver(to=Role.CLIENT)
    assert [frame.type for frame in sent_frames(pair.client)] == [FrameType.PING]  # BDP probe
    pair.client.acknowledge_received_data(stream_id, DEFAULT_WINDOW // 2)
    assert pair.client.data_to_send() == b""


# Windows negotiated in the handshake.

SMALL = 64 * 1024


def test_each_side_grants_the_receive_window_it_announced() -> None:
    pair = ConnectionPair(client_window=DEFAULT_WINDOW, server_window=SMALL)
    stream_id = pair.open_stream()
    assert pair.server.send_window(stream_id) == DEFAULT_WINDOW
    assert pair.client.send_window(stream_id) == SMALL
    assert pair.client.send_data(stream_id, bytes(SMALL + 1)) == SMALL
    assert pair.deliver(to=Role.SERVER) == [DataReceived(stream_id, bytes(SMALL))]


def test_data_beyond_the_small_window_we_announced_is_fatal() -> None:
    pair = ConnectionPair(client_window=DEFAULT_WINDOW, server_window=SMALL)
    stream_id = pair.open_stream()
    inject(pair.server, Frame(FrameType.DATA, stream_id, bytes(SMALL)))
    with pytest.raises(FlowControlError):
        inject(pair.server, Frame(FrameType.DATA, stream_id, b"x"))
    assert_failed_with(pair.server, ErrorCode.FLOW_CONTROL)


@pytest.mark.parametrize(
    ("client_window", "server_window"), [(None, SMALL), (SMALL, None), (None, None)]
)
def test_an_old_peer_gets_the_default_window_both_ways_whatever_we_offer(
    client_window: int | None, server_window: int | None
) -> None:
    pair = ConnectionPair(client_window=client_window, server_window=server_window)
    stream_id = pair.open_stream()
    assert pair.server.send_window(stream_id) == pair.client.send_window(stream_id)
    assert pair.client.send_window(stream_id) == DEFAULT_WINDOW
    pair.client.send_data(stream_id, bytes(DEFAULT_WINDOW))  # the old protocol's full window
    pair.server.send_data(stream_id, bytes(DEFAULT_WINDOW))
    assert sum(len(e.data) for e in pair.deliver(to=Role.SERVER) if isinstance(e, DataReceived))
    assert sum(len(e.data) for e in pair.deliver(to=Role.CLIENT) if isinstance(e, DataReceived))
    assert pair.server.state is pair.client.state is ConnectionState.OPEN


def test_streams_opened_right_behind_the_welcome_take_the_settled_windows() -> None:
    pair = ConnectionPair(client_window=SMALL, server_window=100, handshake=False)
    pair.server.send_challenge(NONCE)
    pair.deliver(to=Role.CLIENT)
    pair.client.send_hello(HELLO)  # announcing SMALL
    pair.deliver(to=Role.SERVER)
    pair.server.settle_windows(SMALL)
    pair.server.send_welcome(WELCOME)  # announcing 100
    stream_id = pair.server.open_stream("reg-1")  # in the same bytes as the WELCOME
    events = pair.deliver(to=Role.CLIENT)
    assert [type(event).__name__ for event in events] == ["Welcomed", "StreamOpened"]
    pair.client.settle_windows(100)  # the stream exists already, with the default windows
    pair.client.accept_stream(stream_id)
    pair.deliver(to=Role.SERVER)
    assert pair.client.send_window(stream_id) == 100
    assert pair.server.send_window(stream_id) == SMALL
    inject(pair.client, Frame(FrameType.DATA, stream_id, bytes(SMALL)))
    with pytest.raises(FlowControlError):
        inject(pair.client, Frame(FrameType.DATA, stream_id, b"x"))


def test_windows_cannot_change_once_a_stream_was_accepted() -> None:
    pair = ConnectionPair()
    pair.open_stream()
    with pytest.raises(LocalProtocolError, match="settled"):
        pair.client.settle_windows(SMALL)
    with pytest.raises(LocalProtocolError, match="settled"):
        pair.server.settle_windows(SMALL)


# Connection-level frames.


def test_ping_is_answered_automatically() -> None:
    pair = ConnectionPair()
    pair.server.ping(b"12345678")
    assert pair.deliver(to=Role.CLIENT) == [PingReceived(b"12345678")]
    assert pair.deliver(to=Role.SERVER) == [PongReceived(b"12345678")]


def test_ping_needs_8_bytes_and_an_open_connection() -> None:
    with pytest.raises(LocalProtocolError):
        ConnectionPair().client.ping(b"short")
    with pytest.raises(LocalProtocolError):
        TunnelConnection(Role.CLIENT).ping(bytes(8))


def test_go_away_drains() -> None:
    pair = ConnectionPair()
    stream_id = pair.open_stream()
    pair.server.go_away(ErrorCode.SHUTDOWN, "restarting")
    assert pair.server.state is ConnectionState.OPEN
    with pytest.raises(LocalProtocolError, match="draining"):
        pair.server.open_stream("reg-1")
    assert pair.deliver(to=Role.CLIENT) == [GoAwayReceived(ErrorCode.SHUTDOWN, "restarting")]
    pair.client.send_data(stream_id, b"still here")
    assert pair.deliver(to=Role.SERVER) == [DataReceived(stream_id, b"still here")]
    pair.server.send_data(stream_id, b"me too")
    assert pair.deliver(to=Role.CLIENT) == [DataReceived(stream_id, b"me too")]


def test_open_after_the_peer_went_away_is_refused() -> None:
    pair = ConnectionPair()
    inject(pair.client, goaway(ErrorCode.SHUTDOWN))
    with pytest.raises(RemoteProtocolError, match="after GOAWAY"):
        inject(pair.client, Frame(FrameType.OPEN, 1, b"reg-1"))


def test_streams_opened_after_the_client_went_away_are_refused() -> None:
    pair = ConnectionPair()
    pair.client.go_away()
    stream_id = pair.server.open_stream("reg-1")  # races the client's GOAWAY
    assert pair.deliver(to=Role.CLIENT) == []
    assert pair.deliver(to=Role.SERVER) == [
        GoAwayReceived(ErrorCode.SHUTDOWN, ""),
        StreamReset(stream_id, ErrorCode.REFUSED),
    ]


def test_goaway_reason_may_be_invalid_utf8() -> None:
    pair = ConnectionPair()
    assert inject(pair.client, goaway(ErrorCode.INTERNAL, b"bad \xff")) == [
        GoAwayReceived(ErrorCode.INTERNAL, "bad \ufffd")
    ]


def test_close_is_idempotent() -> None:
    pair = ConnectionPair()
    pair.open_stream()
    pair.server.close(ErrorCode.NO_ERROR, "bye")
    pair.server.close()
    pair.server.go_away()
    assert sent_frames(pair.server) == [goaway(ErrorCode.NO_ERROR, b"bye")]
    assert pair.server.stream_ids() == ()
    with pytest.raises(LocalProtocolError):
        pair.server.open_stream("reg-1")


def test_long_close_reason_is_truncated_to_one_frame() -> None:
    pair = ConnectionPair(max_payload=100)
    pair.server.close(reason="x" * 1000)
    assert pair.deliver(to=Role.CLIENT) == [GoAwayReceived(ErrorCode.NO_ERROR, "x" * 96)]


def test_eof_terminates() -> None:
    pair = ConnectionPair()
    assert pair.client.receive_data(b"") == [
        ConnectionTerminated(ErrorCode.PROTOCOL, "carrier closed without GOAWAY")
    ]
    assert pair.client.state is ConnectionState.CLOSED
    assert pair.client.receive_data(b"") == []


def test_eof_after_goaway_carries_its_code() -> None:
    pair = ConnectionPair()
    pair.server.go_away(ErrorCode.SHUTDOWN, "restarting")
    pair.deliver(to=Role.CLIENT)
    assert pair.client.receive_data(b"") == [ConnectionTerminated(ErrorCode.SHUTDOWN, "restarting")]


def test_input_after_a_protocol_error_is_ignored() -> None:
    pair = ConnectionPair()
    with pytest.raises(RemoteProtocolError):
        inject(pair.client, Frame(FrameType.DATA, 9, b"x"))
    assert inject(pair.client, Frame(FrameType.PING, 0, bytes(8))) == []
    assert pair.client.receive_data(b"") == []


def test_byte_by_byte_delivery_gives_the_same_events() -> None:
    pair = ConnectionPair(max_payload=1000)
    stream_id = pair.open_stream()
    pair.server.send_data(stream_id, bytes(range(256)) * 10)
    pair.server.ping(b"pingpong")
    pair.server.end_stream(stream_id)
    data = pair.server.data_to_send()
    events = [
        event for n in range(len(data)) for event in pair.client.receive_data(data[n : n + 1])
    ]
    assert b"".join(e.data for e in events if isinstance(e, DataReceived)) == bytes(range(256)) * 10
    assert events[-2:] == [PingReceived(b"pingpong"), StreamEnded(stream_id)]
    assert len(events) == 5


def test_statistics() -> None:
    pair = ConnectionPair()
    stream_id = pair.open_stream()
    pair.server.send_data(stream_id, bytes(100))
    pair.deliver(to=Role.CLIENT)
    server, client = pair.server.statistics(), pair.client.statistics()
    assert (server.open_streams, server.data_bytes_sent, server.frames_sent) == (1, 100, 4)
    assert (client.data_bytes_received, client.frames_received, client.frames_sent) == (100, 4, 2)
    assert (server.frames_received, server.data_bytes_received) == (2, 0)
    assert server.window_growth == client.window_growth == 0


def test_replies_the_peer_caused_count_in_the_reply_backlog_until_drained() -> None:
    pair = ConnectionPair()
    pair.client.ping(bytes(8))  # our own frames are not replies
    assert pair.client.reply_backlog == 0
    inject(pair.client, *[Frame(FrameType.PING, 0, bytes(8))] * 3)
    assert pair.client.reply_backlog == 3 * 20  # three PONGs of 12 + 8 bytes
    first = pair.client.data_to_send(max_bytes=40)  # our PING and the first PONG
    assert len(first) == 40
    assert pair.client.reply_backlog == 2 * 20
    pair.client.data_to_send()
    assert pair.client.reply_backlog == 0


# Windows that grow with the link.


def _window_limited_round_trip(
    pair: ConnectionPair, stream_id: int, consumed: Callable[[int], object] = int
) -> None:
    """The server sends all its credit; the client reads each piece as it comes (and tells
    ``consumed`` how much). The PONG of the BDP probe the client sends meanwhile comes back
    after the last byte: one round trip carried the whole window."""
    window = pair.server.send_window(stream_id)
    pair.server.send_data(stream_id, bytes(window))
    for chunk in decode_all(pair.server.data_to_send()):
        pair.client.receive_data(encode_frame(chunk))
        pair.client.acknowledge_received_data(stream_id, len(chunk.payload))
        consumed(len(chunk.payload))
        pair.deliver(to=Role.SERVER)  # credit, and the probe: its PONG waits at the server
    pair.deliver(to=Role.CLIENT)  # the PONG, and with it the grown window's credit
    pair.deliver(to=Role.SERVER)


@pytest.mark.parametrize("window", [DEFAULT_WINDOW, SMALL])
def test_a_window_limited_stream_grows_its_window_up_to_the_maximum(window: int) -> None:
    pair = ConnectionPair(client_window=window)
    stream_id = pair.open_stream()
    windows = []
    for _ in range(8):
        _window_limited_round_trip(pair, stream_id)
        windows.append(pair.server.send_window(stream_id))
    assert windows[0] == max(4 * window, DEFAULT_WINDOW)  # a small window catches up at once
    assert windows == sorted(windows)
    assert windows[-1] == MAX_WINDOW


@pytest.mark.parametrize("window", [DEFAULT_WINDOW, SMALL])
def test_a_slow_reader_never_grows_its_window(window: int) -> None:
    pair = ConnectionPair(client_window=window)
    stream_id = pair.open_stream()
    pair.server.send_data(stream_id, bytes(window))
    pair.deliver(to=Role.CLIENT)  # the whole window arrives, and a probe goes out
    pair.deliver(to=Role.SERVER)
    pair.deliver(to=Role.CLIENT)  # its PONG: the window came in one round trip...
    for _ in range(64):  # ...but the reader takes a sixteenth of it a round trip from now on
        pair.client.acknowledge_received_data(stream_id, window // 16)
        pair.deliver(to=Role.SERVER)
        pair.server.send_data(stream_id, bytes(pair.server.send_window(stream_id)))
        pair.deliver(to=Role.CLIENT)
    assert pair.server.send_window(stream_id) <= window


class _SendQueue:
    """The send queue of a socket whose reader never reads: all that was written stays."""

    def __init__(self) -> None:
        self.size = 0

    def take(self, size: int) -> None:
        self.size += size


@pytest.mark.parametrize("window", [DEFAULT_WINDOW, SMALL])
def test_a_queue_below_the_reader_that_takes_the_window_does_not_grow_it(window: int) -> None:
    """A relay writes each piece into a socket whose reader is slow: the kernel queues it all
    (the socket's send queue grows by what was consumed). Reading faster than the window
    allows is what it looks like; it is not, and the window stays as it was."""
    pair = ConnectionPair(client_window=window)
    queue = _SendQueue()
    pair.client.backlog_of = lambda stream_id: queue.size
    stream_id = pair.open_stream()
    for _ in range(8):
        _window_limited_round_trip(pair, stream_id, consumed=queue.take)
    assert pair.server.send_window(stream_id) == window
    assert pair.client.statistics().window_growth == 0


def test_a_steady_queue_below_a_fast_reader_does_not_stop_its_growth() -> None:
    """Bytes in flight to a far reader sit in the socket's send queue too, but as many each
    round trip: all that was consumed left, and the window grows as without a queue."""
    pair = ConnectionPair()
    pair.client.backlog_of = lambda stream_id: 300_000
    stream_id = pair.open_stream()
    for _ in range(8):
        _window_limited_round_trip(pair, stream_id)
    assert pair.server.send_window(stream_id) == MAX_WINDOW
    assert pair.client.statistics().window_growth == MAX_WINDOW - DEFAULT_WINDOW


@pytest.mark.parametrize("window", [DEFAULT_WINDOW, SMALL])
def test_what_a_peer_can_make_us_buffer_is_streams_times_window_plus_the_budget(
    window: int,
) -> None:
    pair = ConnectionPair(client_window=window)
    streams = [pair.open_stream() for _ in range(2 * WINDOW_GROWTH_BUDGET // MAX_WINDOW)]
    for _ in range(8):
        for stream_id in streams:
            _window_limited_round_trip(pair, stream_id)
    credit = sum(pair.server.send_window(stream_id) for stream_id in streams)
    assert credit == len(streams) * window + WINDOW_GROWTH_BUDGET
    pair.server.reset_stream(streams[0])  # a closed stream gives its growth back
    pair.deliver(to=Role.CLIENT)
    extra = pair.open_stream()
    for _ in range(8):
        _window_limited_round_trip(pair, extra)
    assert pair.server.send_window(extra) > window


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("1001", ("1001", StreamKind.HTTP)),
        (stream_target("1001", StreamKind.PROBE), ("1001", StreamKind.PROBE)),
        (stream_target("1001", StreamKind.TCP), ("1001", StreamKind.TCP)),
        ("1001/-g2c-interceptx", ("1001", StreamKind.HTTP)),  # not exactly: never answered
        ("1001/tcpx", ("1001", StreamKind.HTTP)),
    ],
)
def test_an_open_target_names_a_registration_and_what_the_stream_carries(
    target: str, expected: tuple[str, StreamKind]
) -> None:
    assert split_target(target) == expected
