"""Wire format of the petit tunnel, kept apart so both carriers and the tests share one codec.

Every frame is a 12-byte header followed by ``length`` payload bytes::

    version:u8  type:u8  flags:u16  stream_id:u32  length:u32   (network byte order)

Stream 0 is the connection itself (CHALLENGE, HELLO, WELCOME, PING, PONG, GOAWAY). Only the
server opens streams, with odd ids 1, 3, 5, ... The decoder is incremental and does no I/O.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from petit.errors import ErrorCode, RemoteProtocolError

VERSION: Final = 1
HEADER: Final = struct.Struct("!BBHII")
MAX_PAYLOAD: Final = 64 * 1024  # bytes; well under trio-websocket's 1 MiB message limit


class FrameType(enum.IntEnum):
    """What a frame means; the value is the wire byte, so never renumber."""

    CHALLENGE = 0  # server->client, stream 0, payload: nonce bytes (the driver uses 32)
    HELLO = 1  # client->server, stream 0, payload: opaque bytes (JSON claims, built by the driver)
    WELCOME = 2  # server->client, stream 0, payload: opaque bytes (JSON, built by the driver)
    OPEN = 3  # server->client, new stream id, payload: UTF-8 target (registration id)
    ACCEPT = 4  # client->server, payload empty: local target reached
    DATA = 5
    END = 6  # half-close: the sender will send no more DATA on this stream
    RESET = 7  # abort the stream; payload: u32 ErrorCode
    WINDOW_UPDATE = 8  # payload: u32 credit increment (> 0)
    PING = 9  # stream 0, payload: 8 opaque bytes
    PONG = 10  # stream 0, payload: the ping's 8 bytes
    GOAWAY = 11  # stream 0, payload: u32 ErrorCode + UTF-8 reason


_FRAME_TYPES: Final = {frame_type.value: frame_type for frame_type in FrameType}

# Compact the decoder's buffer once this many decoded bytes sit before the read offset, so a
# buffer full of small frames costs one copy per feed() instead of one per frame.
_COMPACT_AFTER: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded (or to-be-encoded) frame."""

    type: FrameType
    stream_id: int
    payload: bytes = b""
    flags: int = 0  # reserved: sent as 0, ignored on receipt


def encode_header(frame_type: FrameType, stream_id: int, length: int, flags: int = 0) -> bytes:
    """Return only the header, so DATA payloads can be appended without an extra copy."""
    return HEADER.pack(VERSION, frame_type, flags, stream_id, length)


def encode_frame(frame: Frame) -> bytes:
    """Return the wire bytes of ``frame``."""
    return (
        encode_header(frame.type, frame.stream_id, len(frame.payload), frame.flags) + frame.payload
    )


class FrameDecoder:
    """Incremental decoder: ``feed()`` bytes, then call ``next_frame()`` until it returns None.

    A frame split across any number of ``feed()`` calls decodes the same as one delivered whole.
    The header is validated as soon as it is complete, before waiting for the payload.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buffer: bytes | bytearray = b""  # the fed bytes, or a bytearray once they pile up
        self._offset = 0  # start of the first undecoded byte in _buffer
        self._max_payload = max_payload

    @property
    def pending(self) -> int:
        """Bytes fed but not yet returned as part of a frame."""
        return len(self._buffer) - self._offset

    def feed(self, data: bytes) -> None:
        """Append bytes received from the peer."""
        if self._offset == len(self._buffer):
            # Nothing pending: decode straight from ``data`` (each payload is then copied
            # once, not into the buffer first); only a trailing partial frame is kept.
            self._buffer = bytes(data)  # no copy of a bytes object; a bytearray may change
            self._offset = 0
            return
        if not isinstance(self._buffer, bytearray):
            self._buffer = bytearray(memoryview(self._buffer)[self._offset :])
            self._offset = 0
        elif self._offset >= _COMPACT_AFTER:
            del self._buffer[: self._offset]
            self._offset = 0
        self._buffer += data

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or None until more bytes are fed.

        Raises:
            RemoteProtocolError: bad version, unknown type, or a declared length over the limit
                (code FRAME_SIZE).
        """
        if self.pending < HEADER.size:
            return None
        version, type_byte, flags, stream_id, length = HEADER.unpack_from(
            self._buffer, self._offset
        )
        if version != VERSION:
            raise RemoteProtocolError(f"unsupported protocol version {version}")
        frame_type = _FRAME_TYPES.get(type_byte)
        if frame_type is None:
            raise RemoteProtocolError(f"unknown frame type {type_byte:#x}")
        if length > self._max_payload:
            raise RemoteProtocolError(
                f"{length}-byte {frame_type.name} frame exceeds the {self._max_payload}-byte limit",
                code=ErrorCode.FRAME_SIZE,
            )
        start = self._offset + HEADER.size
        end = start + length
        if len(self._buffer) < end:
            return None
        with memoryview(self._buffer) as view:
            payload = bytes(view[start:end])
        self._offset = end
        return Frame(frame_type, stream_id, payload, flags)


def decode_all(data: bytes) -> list[Frame]:
    """Decode ``data`` that must hold only whole frames.

    Raises:
        RemoteProtocolError: the frames are invalid, or ``data`` ends inside a frame.
    """
    decoder = FrameDecoder()
    decoder.feed(data)
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    if decoder.pending:
        raise RemoteProtocolError(f"{decoder.pending} trailing bytes do not form a whole frame")
    return frames
