"""Property tests: the codec round-trips anything, garbage only ever raises RemoteProtocolError,
and a pair of connections under random sends and acknowledgements keeps its windows and bytes.
"""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from petit.connection import Role, StreamState
from petit.events import (
    DataReceived,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from petit.frames import Frame, FrameDecoder, FrameType, encode_frame
from tests.fuzz.targets import feed_connection

from .helpers import ConnectionPair

frames = st.builds(
    Frame,
    st.sampled_from(FrameType),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=200),
    st.integers(0, 2**16 - 1),
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """Cut ``data`` at the given positions (taken modulo its length)."""
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    return [data[start:end] for start, end in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=1000)
@given(st.lists(frames, max_size=10), st.lists(st.integers(0, 10_000), max_size=30))
def test_frames_round_trip_through_any_chunking(sent: list[Frame], cuts: list[int]) -> None:
    decoder = FrameDecoder()
    decoded = []
    for chunk in split(b"".join(map(encode_frame, sent)), cuts):
        decoder.feed(chunk)
        while (frame := decoder.next_frame()) is not None:
            decoded.append(frame)
    assert decoded == sent
    assert decoder.pending == 0


# Plausible frames (small stream ids, payloads of the sizes the checks look for) go deeper into
# the state machine than uniform noise, which mostly fails on the version byte.
plausible_frames = st.builds(
    Frame,
    st.sampled_from(FrameType),
    st.sampled_from([0, 1, 2, 3, 5, 2**32 - 1]),
    st.one_of(
        st.binary(max_size=70),
        st.sampled_from([b"", bytes(4), b"\xff" * 4, b"\x00\x00\x01\x00", bytes(8), bytes(32)]),
    ),
)
wire_garbage = st.lists(
    st.one_of(plausible_frames.map(encode_frame), st.binary(min_size=1, max_size=30)),
    min_size=1,
    max_size=12,
)


@settings(max_examples=1000)
@given(
    st.sampled_from(Role),
    st.booleans(),
    wire_garbage,
    st.lists(st.integers(0, 1000), max_size=10),
)
def test_garbage_only_raises_remote_protocol_error(
    receiver: Role, handshake: bool, garbage: list[bytes], cuts: list[int]
) -> None:
    feed_connection(receiver, handshake, split(b"".join(garbage), cuts))


def test_split_keeps_every_byte() -> None:
    assert split(b"abcdef", [2, 4, 4, 100]) == [b"ab", b"cd", b"ef"]
    assert split(b"abc", []) == [b"abc"]


WINDOW = 500
MAX_PAYLOAD = 64
PATTERN = bytes(n % 251 for n in range(251 + 3 * WINDOW))
SENDABLE = {StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE}


def peer_of(role: Role) -> Role:
    return Role.CLIENT if role is Role.SERVER else Role.SERVER


class TunnelPairMachine(RuleBasedStateMachine):
    """Random opens, sends, acknowledgements, ends, resets and deliveries over one pair.

    Keys ``(stream_id, role)`` name one direction of a stream by the role that sends on it.
    """

    streams = Bundle("streams")

    def __init__(self) -> None:
        super().__init__()
        self.pair = ConnectionPair(
            client_window=WINDOW, server_window=WINDOW, max_payload=MAX_PAYLOAD
        )
        self.sent: dict[tuple[int, Role], bytearray] = {}
        self.received: dict[tuple[int, Role], bytearray] = {}
        self.granted: dict[tuple[int, Role], int] = {}  # credit the sender got back
        self.unacknowledged: dict[tuple[int, Role], int] = {}  # bytes the receiver holds
        self.reset_streams: set[int] = set()

    @rule(target=streams)
    def open_stream(self) -> int:
        stream_id = self.pair.server.open_stream("reg-1")
        for role in Role:
            self.sent[stream_id, role] = bytearray()
            self.received[stream_id, role] = bytearray()
            self.granted[stream_id, role] = 0
            self.unacknowledged[stream_id, role] = 0
        return stream_id

    @rule(stream_id=streams, sender=st.sampled_from(Role), size=st.integers(1, 3 * WINDOW))
    def send(self, stream_id: int, sender: Role, size: int) -> None:
        if not self.may_send(sender, stream_id):
            return
        connection = self.pair.connection(sender)
        window = connection.send_window(stream_id)
        sent = self.sent[stream_id, sender]
        offset = len(sent) % 251
        queued = connection.send_data(stream_id, PATTERN[offset : offset + size])
        assert queued == min(size, window)
        sent += PATTERN[offset : offset + queued]

    @rule(stream_id=streams, sender=st.sampled_from(Role))
    def end(self, stream_id: int, sender: Role) -> None:
        if self.may_send(sender, stream_id):
            self.pair.connection(sender).end_stream(stream_id)

    @rule(stream_id=streams, role=st.sampled_from(Role))
    def reset(self, stream_id: int, role: Role) -> None:
        if stream_id in self.pair.connection(role).stream_ids():
            self.pair.connection(role).reset_stream(stream_id)
            self.reset_streams.add(stream_id)

    @rule(stream_id=streams, receiver=st.sampled_from(Role), size=st.integers(0, WINDOW))
    def acknowledge(self, stream_id: int, receiver: Role, size: int) -> None:
        key = (stream_id, receiver)
        size = min(size, self.unacknowledged[key])
        if not size:
            return  # the receiver may not even have heard of the stream yet
        self.pair.connection(receiver).acknowledge_received_data(stream_id, size)
        self.unacknowledged[key] -= size

    @rule(to=st.sampled_from(Role))
    def deliver(self, to: Role) -> None:
        for event in self.pair.deliver(to):
            match event:
                case StreamOpened(stream_id=stream_id) if (
                    stream_id in self.pair.client.stream_ids()  # no RESET followed the OPEN
                ):
                    self.pair.client.accept_stream(stream_id)
                case DataReceived(stream_id=stream_id, data=data):
                    self.received[stream_id, peer_of(to)] += data
                    self.unacknowledged[stream_id, to] += len(data)
                case WindowUpdated(stream_id=stream_id, delta=delta):
                    self.granted[stream_id, to] += delta
                case StreamReset(stream_id=stream_id):
                    self.reset_streams.add(stream_id)

    @rule()
    def flush(self) -> None:
        """Deliver until both sides are quiet: every byte sent on a stream not reset arrived."""
        while True:
            frames_before = self.frames_received()
            self.deliver(Role.CLIENT)
            self.deliver(Role.SERVER)
            if self.frames_received() == frames_before:
                break
        for (stream_id, sender), sent in self.sent.items():
            if stream_id not in self.reset_streams:
                assert self.received[stream_id, sender] == sent

    def may_send(self, role: Role, stream_id: int) -> bool:
        connection = self.pair.connection(role)
        return stream_id in connection.stream_ids() and (
            connection.stream_state(stream_id) in SENDABLE
        )

    def frames_received(self) -> int:
        return sum(self.pair.connection(role).statistics().frames_received for role in Role)

    @invariant()
    def bytes_arrive_in_order(self) -> None:
        for key, received in self.received.items():
            assert self.sent[key].startswith(received)

    @invariant()
    def send_windows_match_credit(self) -> None:
        for role in Role:
            connection = self.pair.connection(role)
            for stream_id in connection.stream_ids():
                key = (stream_id, role)
                window = connection.send_window(stream_id)
                assert window == WINDOW + self.granted[key] - len(self.sent[key])
                assert 0 <= window <= WINDOW + self.granted[key]


TunnelPairMachine.TestCase.settings = settings(max_examples=250, stateful_step_count=50)
test_tunnel_pair = TunnelPairMachine.TestCase
