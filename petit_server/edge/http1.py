"""HTTP/1.1 messages for the ingress: heads parsed by llhttp (httptools), bodies framed here.

Sans-IO, as h11 was on this path before it (four h11 passes per proxied request were a third
of the server's CPU): a ``Reader`` turns the bytes one peer sends into events (a head, body
bytes, END), and ``request_head``, ``response_head`` and ``chunk`` turn what the ingress
decided into bytes. What a message means for the connection (keep-alive, 100-continue,
upgrades, which framing to answer with) is the ingress's business, not this module's.

# Strictness

- A head ends at its first blank line (found as h11 finds it) and may be ``MAX_HEAD`` bytes
  long: past that, complete or not, it is refused with 431.
- Its start line is matched here, with the grammar h11 used (RFC 9112: any token is a method,
  a target is visible ASCII, single spaces). HTTP/1.x only: another major version gets 505.
- Its header section is parsed by llhttp in strict mode (we set no leniency). llhttp refuses
  Content-Length with Transfer-Encoding, a repeated or malformed Content-Length or one past
  2**64, bad bytes in names and values, bare LF line ends and obs-fold lines, which are
  unfolded into one line first, as h11 did. h11 took some of these: ``Content-Length: 4, 4``
  and two equal ones, 20-digit lengths, bare LF, control bytes other than NUL in a value.
- Where llhttp alone would accept what h11 refused, a check here refuses it the same way:
  Transfer-Encoding must be exactly one ``chunked`` (else 501, as h11), a request names at
  most one Host (an HTTP/1.1 one exactly one), a request line may not start with a space or
  a control byte (refused before its end, as h11 did), values lose their trailing whitespace.
- Bodies are framed here (RFC 9112 section 6): by Content-Length, chunked (chunk extensions
  and trailers read and dropped) or, for a response only, until the peer closes; a response
  to HEAD, a 1xx, 204 and 304 have none. Body bytes are handed out as they arrive (at most
  what one read brought), never collected whole, so the caller's reads pace the peer.

``tests/proto/test_http1.py`` feeds generated heads to h11 and to this module and checks they
agree, except where this docstring says otherwise.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final

import httptools

MAX_HEAD: Final = 32 * 1024  # bytes of a head (start line, fields, blank line)
CHUNKED: Final = -1  # a message's ``body``: chunked transfer coding
UNTIL_CLOSE: Final = -2  # a response's ``body``: it ends when its sender closes


class ProtocolError(Exception):
    """The peer sent something that is not HTTP/1.1 we relay; ``status`` answers it."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Signal(enum.Enum):
    NEED_DATA = "the bytes at hand end inside a message"
    END = "the message ended"
    CLOSED = "the peer closed between messages"


NEED_DATA: Final = Signal.NEED_DATA
END: Final = Signal.END
CLOSED: Final = Signal.CLOSED

Headers = list[tuple[bytes, bytes]]  # names lowercase, values without surrounding whitespace


@dataclass(slots=True)
class Request:
    method: bytes
    target: bytes
    version: bytes  # b"1.1", b"1.0"
    headers: Headers
    body: int  # Content-Length, or CHUNKED
    connection: set[bytes]  # the Connection field's tokens, lowercase (``tokens``)


@dataclass(slots=True)
class Response:
    status: int
    reason: bytes
    version: bytes
    headers: Headers
    body: int  # Content-Length (0: none), CHUNKED or UNTIL_CLOSE
    connection: set[bytes]  # the Connection field's tokens, lowercase (``tokens``)


Event = Request | Response | bytes | Signal


def tokens(headers: Headers, wanted: bytes) -> set[bytes]:
    """The comma-separated values of every ``wanted`` field (Connection, Expect), lowercase."""
    return {
        token.strip().lower()
        for name, value in headers
        if name == wanted
        for token in value.split(b",")
    }


def request_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    """A request head. Nothing here is checked: every piece must come from a head a ``Reader``
    parsed, or be the ingress's own (a Host it validated, X-Forwarded-*)."""
    return b"%s %s HTTP/1.1\r\n%s\r\n" % (method, target, _field_lines(headers))


def response_head(status: int, reason: bytes, headers: Headers) -> bytes:
    """A response head; as for ``request_head``, its pieces must be parsed or our own."""
    return b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, _field_lines(headers))


def chunk(data: bytes) -> list[bytes]:
    """``data`` as one chunk of a chunked body (pieces, so ``data`` is not copied here)."""
    return [b"%x\r\n" % len(data), data, b"\r\n"]


LAST_CHUNK: Final = b"0\r\n\r\n"


def _field_lines(headers: Headers) -> bytes:
    return b"".join([b"%s: %s\r\n" % field for field in headers])


class _State(enum.Enum):
    HEAD = enum.auto()
    LENGTH = enum.auto()  # a body of ``_left`` more bytes
    CHUNK_HEADER = enum.auto()
    CHUNK_DATA = enum.auto()  # ``_left`` more bytes of this chunk
    CHUNK_END = enum.auto()  # the CRLF after a chunk's data
    TRAILER = enum.auto()
    UNTIL_CLOSE = enum.auto()
    ENDED = enum.auto()  # END is the next event
    DONE = enum.auto()  # until ``next_message``
    SWITCHED = enum.auto()  # after a 101: the rest is another protocol's


class Reader:
    """The messages one peer sends on one connection, as events: a head (``Request`` or
    ``Response``), then its body as ``bytes`` pieces, then END. ``next_message`` starts
    the next one. ProtocolError for anything we refuse to relay."""

    __slots__ = ("_buffer", "_eof", "_left", "_pos", "_searched", "_state")

    def __init__(self) -> None:
        self._buffer: bytes | bytearray = b""
        self._pos = 0  # where the unread part of _buffer begins
        self._searched = 0  # how far the search for a blank line got
        self._eof = False
        self._state = _State.HEAD
        self._left = 0

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` when it closed."""
        if not data:
            self._eof = True
        elif self._pos == len(self._buffer):
            self._buffer, self._pos, self._searched = data, 0, 0
        elif isinstance(self._buffer, bytearray) and not self._pos:
            self._buffer += data
        else:
            self._buffer = bytearray(self._buffer[self._pos :]) + data
            self._searched = max(0, self._searched - self._pos)
            self._pos = 0

    @property
    def pending(self) -> bytes:
        """What was received past the events handed out: after END, the next message's
        bytes (pipelined); after a switch, the new protocol's."""
        return bytes(self._buffer[self._pos :])

    @property
    def buffered(self) -> int:
        """How many bytes ``pending`` holds."""
        return len(self._buffer) - self._pos

    @property
    def in_body(self) -> bool:
        """Whether a head was read and its body's events (END at least) are still to come."""
        return self._state not in (_State.HEAD, _State.DONE, _State.SWITCHED)

    @property
    def done(self) -> bool:
        """Whether the message ended (END was handed out)."""
        return self._state is _State.DONE

    @property
    def at_eof(self) -> bool:
        """Whether the peer closed its side (``receive_data(b"")``)."""
        return self._eof

    def next_message(self) -> None:
        assert self._state is _State.DONE, self._state
        self._state = _State.HEAD

    def next_event(self) -> Event:
        state = self._state
        if state is _State.HEAD:
            return self._next_head()
        if state is _State.ENDED:
            self._state = _State.DONE
            return END
        if state is _State.LENGTH or state is _State.CHUNK_DATA:
            if self._pos == len(self._buffer):
                if self._eof:
                    raise ProtocolError("the peer closed in the middle of a body")
                return NEED_DATA
            data = self._take(self._left)
            self._left -= len(data)
            if not self._left:
                self._state = _State.ENDED if state is _State.LENGTH else _State.CHUNK_END
            return data
        if state is _State.UNTIL_CLOSE:
            if self._pos < len(self._buffer):
                return self._take(len(self._buffer))
            if self._eof:
                self._state = _State.DONE
                return END
            return NEED_DATA
        if state is _State.CHUNK_HEADER or state is _State.CHUNK_END:
            if not self._chunk_framing():
                return self._need_data()
            return self.next_event()
        if state is _State.TRAILER:
            if not self._trailer():
                return self._need_data()
            self._state = _State.DONE
            return END
        raise AssertionError(f"no events in {state}")

    def _need_data(self) -> Signal:
        if self._eof:
            raise ProtocolError("the peer closed in the middle of a chunked body")
        return NEED_DATA

    def _take(self, size: int) -> bytes:
        buffer, start = self._buffer, self._pos
        end = min(start + size, len(buffer))
        self._pos = end
        if start == 0 and end == len(buffer) and isinstance(buffer, bytes):
            return buffer  # the common case: all one read held, passed on as it is
        return bytes(buffer[start:end])

    def _next_head(self) -> Event:
        buffer, start = self._buffer, self._pos
        found = _HEAD_END.search(buffer, max(start, self._searched - 2))
        if found is None:
            self._searched = len(buffer)
            if len(buffer) - start > MAX_HEAD:
                raise ProtocolError("header fields too large", 431)
            if self._eof:
                if start == len(buffer):
                    return CLOSED
                raise ProtocolError("the peer closed in the middle of a head")
            return NEED_DATA
        end = found.end()
        if end - start > MAX_HEAD:
            raise ProtocolError("header fields too large", 431)
        self._pos = self._searched = end
        return self._parse_head(bytes(buffer[start:end]))

    def _parse_head(self, head: bytes) -> Request | Response:
        raise NotImplementedError

    def _chunk_framing(self) -> bool:
        """Read a chunk's header or the CRLF after its data; False: need more bytes."""
        buffer, start = self._buffer, self._pos
        if self._state is _State.CHUNK_END:
            ending = buffer[start : start + 2]
            if ending != b"\r\n"[: len(ending)]:
                raise ProtocolError("a chunk's data does not end with CRLF")
            if len(ending) < 2:
                return False
            self._pos += 2
            self._state = _State.CHUNK_HEADER
            return True
        end = buffer.find(b"\r\n", start)
        if end < 0:
            if len(buffer) - start > MAX_HEAD:
                raise ProtocolError("a chunk header too long")
            return False
        header = _CHUNK_HEADER.fullmatch(buffer, start, end)
        if header is None:
            raise ProtocolError(f"bad chunk header {bytes(buffer[start:end])[:40]!r}")
        self._pos = end + 2
        self._left = int(header[1], 16)
        self._state = _State.CHUNK_DATA if self._left else _State.TRAILER
        return True

    def _trailer(self) -> bool:
        """Read (and drop) the trailer section after the last chunk; False: need more."""
        buffer, start = self._buffer, self._pos
        if buffer[start : start + 2] == b"\r\n":
            self._pos += 2
            return True
        found = _HEAD_END.search(buffer, start)
        if found is None:
            if len(buffer) - start > MAX_HEAD:
                raise ProtocolError("a trailer section too long")
            return False
        self._pos = found.end()
        _fields(httptools.HttpRequestParser, _AS_REQUEST, bytes(buffer[start : found.end()]))
        return True


class RequestReader(Reader):
    """A caller's requests."""

    __slots__ = ()

    def _next_head(self) -> Event:
        if self._pos < len(self._buffer) and self._buffer[self._pos] < 0x21:
            # Refused at once, as h11 did: no method starts so (a TLS handshake does).
            raise ProtocolError("a request line must start with its method")
        return super()._next_head()

    def _parse_head(self, head: bytes) -> Request:
        (method, target, version), fields = _start_line(head, _REQUEST_LINE, "request")
        if version[0] != ord("1"):
            raise ProtocolError("only HTTP/1.0 and HTTP/1.1 are served", 505)
        headers = _fields(httptools.HttpRequestParser, _AS_REQUEST, fields)
        hosts = sum(name == b"host" for name, _ in headers)
        if hosts > 1 or (hosts == 0 and version == b"1.1"):
            raise ProtocolError("a request names one Host (HTTP/1.1: exactly one)")
        body = _framing(headers)
        self._state = _body_state(body)
        self._left = body
        return Request(method, target, version, headers, body, tokens(headers, b"connection"))


class ResponseReader(Reader):
    """A service's responses. Set ``for_head`` while the request they answer is a HEAD."""

    __slots__ = ("for_head",)

    def __init__(self) -> None:
        super().__init__()
        self.for_head = False

    def _parse_head(self, head: bytes) -> Response:
        (version, status_code, reason), fields = _start_line(head, _STATUS_LINE, "status")
        if version[0] != ord("1"):
            raise ProtocolError("not an HTTP/1.x response")
        headers = _fields(httptools.HttpResponseParser, _AS_RESPONSE, fields)
        status = int(status_code)
        if status < 100:
            raise ProtocolError(f"status {status} is not an HTTP status (100-999)")
        body = _framing(headers)
        if status < 200 or status in (204, 304) or self.for_head:
            body = 0
        elif body == 0 and not any(name == b"content-length" for name, _ in headers):
            body = UNTIL_CLOSE
        if status == 101:
            self._state = _State.SWITCHED
        elif status < 200:
            self._state = _State.HEAD  # an interim response: the final one follows
        else:
            self._state = _body_state(body)
            self._left = body
        return Response(
            status, reason or b"", version, headers, body, tokens(headers, b"connection")
        )


def _body_state(body: int) -> _State:
    if body == CHUNKED:
        return _State.CHUNK_HEADER
    if body == UNTIL_CLOSE:
        return _State.UNTIL_CLOSE
    return _State.LENGTH if body else _State.ENDED


def _framing(headers: Headers) -> int:
    """A message's body length, CHUNKED, or 0 (none declared). llhttp already refused
    Content-Length with Transfer-Encoding and malformed or repeated lengths."""
    codings = [value for name, value in headers if name == b"transfer-encoding"]
    if codings:
        if len(codings) != 1 or codings[0].lower() != b"chunked":
            raise ProtocolError("only Transfer-Encoding: chunked is supported", 501)
        return CHUNKED
    return next((int(value) for name, value in headers if name == b"content-length"), 0)


class _Fields:
    """httptools' callbacks for a header section: its fields, and whether it ended."""

    __slots__ = ("complete", "fields")

    def __init__(self) -> None:
        self.fields: Headers = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        self.complete = True


def _start_line(
    head: bytes, pattern: re.Pattern[bytes], what: str
) -> tuple[tuple[bytes, ...], bytes]:
    """The start line's fields (``pattern``'s groups) and the header section after it.

    Raises:
        ProtocolError: the line does not match (``what`` names it: request or status).
    """
    line_end = head.find(b"\r\n")
    line = pattern.fullmatch(head, 0, max(line_end, 0))
    if line is None:
        raise ProtocolError(f"bad {what} line {head[: max(line_end, 0)][:80]!r}")
    return line.groups(), head[line_end + 2 :]


def _fields(
    parser: type[httptools.HttpRequestParser] | type[httptools.HttpResponseParser],
    start_line: bytes,
    section: bytes,
) -> Headers:
    """The fields of a header section (ending with its blank line), parsed by llhttp after
    a start line of our own (ours was matched already, with h11's grammar)."""
    if section[:1] in (b" ", b"\t"):
        raise ProtocolError("a continuation line before any header field")
    if b"\r\n " in section or b"\r\n\t" in section:
        section = _OBS_FOLD.sub(b" ", section)
    fields = _Fields()
    try:
        llhttp = parser(fields)
        llhttp.feed_data(start_line)
        llhttp.feed_data(section)
    except httptools.HttpParserUpgrade:
        pass  # an upgrade too ends with its head: what follows is framed by the ingress
    except httptools.HttpParserError as exc:
        raise ProtocolError(f"bad header section: {exc}") from None
    if not fields.complete:
        raise ProtocolError("bad header section")
    return fields.fields


_AS_REQUEST: Final = b"GET / HTTP/1.1\r\n"
_AS_RESPONSE: Final = b"HTTP/1.1 200 OK\r\n"
_HEAD_END: Final = re.compile(rb"\n\r?\n")
_OBS_FOLD: Final = re.compile(rb"\r\n[ \t]+")
_TOKEN: Final = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_REQUEST_LINE: Final = re.compile(rb"(%s) ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])" % _TOKEN)
_STATUS_LINE: Final = re.compile(rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: ((?:[ \t]|[^\x00\s])*))?")
_CHUNK_HEADER: Final = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;.*)?[ \t]*")
