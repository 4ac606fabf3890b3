"""The wire codec: round trips, chunking independence, and header checks before the payload."""

from __future__ import annotations

import pytest

from petit.errors import ErrorCode, RemoteProtocolError
from petit.frames import (
    HEADER,
    MAX_PAYLOAD,
    VERSION,
    Frame,
    FrameDecoder,
    FrameType,
    decode_all,
    encode_frame,
    encode_header,
)

FRAMES = [
    Frame(FrameType.CHALLENGE, 0, bytes(32)),
    Frame(FrameType.OPEN, 1, b"reg-1"),
    Frame(FrameType.ACCEPT, 1),
    Frame(FrameType.DATA, 1, b"hello world" * 100, flags=0x8001),
    Frame(FrameType.END, 1),
    Frame(FrameType.RESET, 3, b"\x00\x00\x00\x06"),
    Frame(FrameType.WINDOW_UPDATE, 2**32 - 1, b"\x00\x01\x00\x00"),
    Frame(FrameType.GOAWAY, 0, b"\x00\x00\x00\x0abye"),
]


def decode_in_chunks(data: bytes, chunk_size: int) -> list[Frame]:
    decoder = FrameDecoder()
    frames = []
    for start in range(0, len(data), chunk_size):
        decoder.feed(data[start : start + chunk_size])
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    assert decoder.pending == 0
    return frames


def test_header_layout() -> None:
    assert encode_frame(Frame(FrameType.DATA, 0x01020304, b"xy", flags=0x0506)) == (
        bytes([VERSION, FrameType.DATA, 0x05, 0x06, 1, 2, 3, 4, 0, 0, 0, 2]) + b"xy"
    )


@pytest.mark.parametrize("frame", FRAMES, ids=lambda frame: frame.type.name)
def test_round_trip(frame: Frame) -> None:
    assert decode_all(encode_frame(frame)) == [frame]


def test_encode_header_is_the_frame_without_its_payload() -> None:
    frame = Frame(FrameType.DATA, 7, b"payload", flags=3)
    header = encode_header(frame.type, frame.stream_id, len(frame.payload), frame.flags)
    assert header + frame.payload == encode_frame(frame)


@pytest.mark.parametrize("chunk_size", [1, 5, 12, 13, 4096])
def test_decoding_does_not_depend_on_chunking(chunk_size: int) -> None:
    data = b"".join(encode_frame(frame) for frame in FRAMES)
    assert decode_in_chunks(data, chunk_size) == FRAMES


def test_many_small_frames_in_large_chunks() -> None:
    frames = [Frame(FrameType.DATA, 1, bytes([n % 256])) for n in range(20_000)]
    data = b"".join(map(encode_frame, frames))
    assert decode_all(data) == frames
    assert decode_in_chunks(data, 4099) == frames  # crosses the buffer compaction threshold


def test_partial_frame_waits_for_the_rest() -> None:
    data = encode_frame(Frame(FrameType.DATA, 1, b"abcdef"))
    decoder = FrameDecoder()
    decoder.feed(data[:-1])
    assert decoder.next_frame() is None
    decoder.feed(data[-1:])
    assert decoder.next_frame() == Frame(FrameType.DATA, 1, b"abcdef")
    assert decoder.next_frame() is None


def test_oversized_length_is_rejected_before_the_payload_arrives() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_header(FrameType.DATA, 1, MAX_PAYLOAD + 1))
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code is ErrorCode.FRAME_SIZE


def test_max_payload_is_configurable() -> None:
    decoder = FrameDecoder(max_payload=10)
    decoder.feed(encode_frame(Frame(FrameType.DATA, 1, bytes(10))))
    assert decoder.next_frame() == Frame(FrameType.DATA, 1, bytes(10))
    decoder.feed(encode_header(FrameType.DATA, 1, 11))
    with pytest.raises(RemoteProtocolError, match="11-byte DATA"):
        decoder.next_frame()


def test_bad_version_is_rejected_from_the_header_alone() -> None:
    decoder = FrameDecoder()
    decoder.feed(HEADER.pack(VERSION + 1, FrameType.DATA, 0, 1, 100))
    with pytest.raises(RemoteProtocolError, match="version 2") as info:
        decoder.next_frame()
    assert info.value.code is ErrorCode.PROTOCOL


def test_unknown_type_is_rejected() -> None:
    decoder = FrameDecoder()
    decoder.feed(HEADER.pack(VERSION, max(FrameType) + 1, 0, 0, 0))
    with pytest.raises(RemoteProtocolError, match="unknown frame type 0xc") as info:
        decoder.next_frame()
    assert info.value.code is ErrorCode.PROTOCOL


def test_decode_all_rejects_a_trailing_partial_frame() -> None:
    data = encode_frame(Frame(FrameType.END, 1)) + encode_frame(Frame(FrameType.DATA, 1, b"ab"))
    with pytest.raises(RemoteProtocolError, match=r"^13 trailing bytes"):
        decode_all(data[:-1])
