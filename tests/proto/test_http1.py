"""The ingress's HTTP/1.1 framing (``petit_server.edge.http1``, llhttp heads) against h11,
which it replaced: the same generated heads and bodies, valid and malformed (the smuggling
shapes among them), fed to both.

They must agree on accept or refuse, and where both accept, on method, target, version,
headers and framing. ``h11_request`` includes the checks the ingress made on top of h11
(Content-Length with Transfer-Encoding: 400). Where we chose to be stricter than h11, the
test names the shape (``stricter``) and checks that we refuse it; nothing h11 refused is
accepted. A long run: ``PETIT_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/proto/test_http1.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import h11
import pytest
from hypothesis import example, given, strategies as st

from petit_server.edge import http1
from tests.proto.test_fuzz_inputs import fuzz_settings


@dataclass(frozen=True)
class Parsed:
    """A head as a parser understood it; ``None`` fields: refused (``status``) or incomplete."""

    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: int  # a Content-Length, http1.CHUNKED or http1.UNTIL_CLOSE


Outcome = Parsed | int | None  # parsed, the status it is refused with, or incomplete


def h11_event(
    connection: h11.Connection, head: bytes, both_lengths: int
) -> h11.Request | h11.Response | h11.InformationalResponse | int | None:
    """What h11 makes of ``head``: its first event, or the status it refuses with (for a
    message with both lengths, ``both_lengths``: the ingress refused those itself), or None
    while incomplete."""
    connection.receive_data(head)
    try:
        event = connection.next_event()
    except h11.RemoteProtocolError as exc:
        return exc.error_status_hint
    if event is h11.NEED_DATA:
        return None
    assert isinstance(event, h11.Request | h11.Response | h11.InformationalResponse), event
    names = [name for name, _ in event.headers]
    if b"content-length" in names and b"transfer-encoding" in names:
        return both_lengths
    return event


def _normalised(headers: Iterable[tuple[bytes, bytes]]) -> http1.Headers:
    """Fields as both parsers are compared on: Transfer-Encoding's value lowercase."""
    return [(n, v.lower() if n == b"transfer-encoding" else v) for n, v in headers]


def h11_request(head: bytes) -> Outcome:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=http1.MAX_HEAD)
    event = h11_event(connection, head, both_lengths=400)
    if event is None or isinstance(event, int):
        return event
    assert isinstance(event, h11.Request), event
    headers = _normalised(event.headers)
    return Parsed(event.method, event.target, event.http_version, headers, _h11_body(headers))


def _h11_body(headers: list[tuple[bytes, bytes]]) -> int:
    if any(name == b"transfer-encoding" for name, _ in headers):
        return http1.CHUNKED
    return next((int(value) for name, value in headers if name == b"content-length"), 0)


def ours(reader: http1.RequestReader | http1.ResponseReader, head: bytes) -> Outcome:
    """What ``http1`` makes of ``head`` with ``reader`` (a request's or a response's)."""
    reader.receive_data(head)
    try:
        event = reader.next_event()
    except http1.ProtocolError as exc:
        return exc.status
    if event is http1.NEED_DATA:
        return None
    assert isinstance(event, http1.Request | http1.Response), event
    headers = _normalised(event.headers)
    if isinstance(event, http1.Response):
        return Parsed(b"", str(event.status).encode(), event.version, headers, event.body)
    return Parsed(event.method, event.target, event.version, headers, event.body)


def ours_request(head: bytes) -> Outcome:
    return ours(http1.RequestReader(), head)


def stricter(head: bytes) -> str | None:
    """Why we refuse a head (request or response) h11 accepted, if it is one of the shapes
    we chose to refuse."""
    head_part = head.split(b"\r\n\r\n", 1)[0]
    if re.search(rb"(?<!\r)\n", head):
        return "a line ends with a bare LF (llhttp wants CRLF; h11 took both)"
    if re.search(rb"[\x01-\x08\x0e-\x1f\x7f]", head_part):
        return "a control character in a field value (RFC 9110 5.5; h11 took all but NUL)"
    lengths = [
        line.split(b":", 1)[1].strip()
        for line in head_part.split(b"\r\n")[1:]
        if line.lower().startswith(b"content-length:")
    ]
    if len(lengths) > 1 or any(b"," in value for value in lengths):
        return "repeated Content-Length, even equal (h11 merged equal ones)"
    if any(value.isdigit() and int(value) >= 2**64 for value in lengths):
        return "a Content-Length past 2**64 (llhttp's bound; h11 took 20 digits)"
    version = re.search(rb"HTTP/([0-9])\.[0-9]", head.split(b"\r\n", 1)[0])
    if version is not None and version[1] != b"1":
        return "an HTTP version other than 1.x: 505 (h11 took any digit.digit)"
    return None


STRICTER_STATUS = {400, 505}


def assert_agree(ours: Outcome, theirs: Outcome, head: bytes) -> None:
    if isinstance(theirs, Parsed) and not isinstance(ours, Parsed):
        reason = stricter(head)
        assert reason is not None, f"we refuse ({ours}) what h11 accepts: {head!r}"
        assert ours in STRICTER_STATUS, (ours, reason)
        return
    if isinstance(theirs, int):
        assert isinstance(ours, int), f"we accept what h11 refuses ({theirs}): {head!r} {ours}"
        return
    assert ours == theirs, head


TOKENS = [b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"CONNECT", b"PROPFIND", b"BREW"]
METHODS = st.sampled_from([*TOKENS, b"get", b"G\x00T", b"", b"GET/", b"\xffGET"])
TARGETS = st.sampled_from(
    [b"/", b"/a?b=c", b"*", b"http://1001.localhost/x", b"a:443", b"/\xff", b"/a\x7f", b""]
)
VERSIONS = st.sampled_from(
    [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9", b"http/1.1", b"HTTP/11"]
)
NAMES = st.sampled_from(
    [
        b"Host",
        b"host",
        b"Content-Length",
        b"Transfer-Encoding",
        b"Connection",
        b"Expect",
        b"X-Custom",
        b"X_Under",
        b"Upgrade",
        b"",
        b"Bad Name",
        b"Bad\x00",
        b"Host ",
        b"\xff",
    ]
)
VALUES = st.one_of(
    st.sampled_from(
        [
            b"1001.localhost",
            b"0",
            b"4",
            b"004",
            b"4, 4",
            b"+4",
            b"-1",
            b" 4 ",
            b"4 4",
            b"99999999999999999999",
            b"chunked",
            b"Chunked",
            b"gzip, chunked",
            b"chunked, gzip",
            b"identity",
            b"close",
            b"keep-alive",
            b"upgrade",
            b"websocket",
            b"100-continue",
            b"",
            b"a\tb",
            b"trailing  ",
            b"\xff\xfeobs",
        ]
    ),
    st.binary(max_size=12),
)
LINE_ENDS = st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r", b"\r\n "])
SEPARATORS = st.sampled_from([b": "] * 6 + [b":", b":\t", b" : ", b": \t "])


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    line_end = draw(LINE_ENDS)
    spaces = draw(st.sampled_from([(b" ", b" ")] * 8 + [(b"  ", b" "), (b"\t", b" ")]))
    head = draw(METHODS) + spaces[0] + draw(TARGETS) + spaces[1] + draw(VERSIONS) + line_end
    for _ in range(draw(st.integers(0, 5))):
        head += draw(NAMES) + draw(SEPARATORS) + draw(VALUES) + draw(LINE_ENDS)
        if draw(st.integers(0, 9)) == 0:
            head += draw(st.sampled_from([b" folded", b"\tfolded", b"   "])) + b"\r\n"
    return head + draw(st.sampled_from([b"\r\n"] * 5 + [b"\n", b""]))


WELL_FORMED = b"GET / HTTP/1.1\r\nHost: 1001.localhost\r\n\r\n"


@fuzz_settings(800)
@given(request_heads())
@example(WELL_FORMED)
@example(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n")
@example(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\n")
@example(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
@example(
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n"
)
@example(b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: first\r\n second\r\n\r\n")
@example(b"GET / HTTP/1.1\r\n folded\r\nHost: a\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nX: y\r\n\r\n")
@example(b"GET / HTTP/1.0\r\n\r\n")
@example(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
@example(b"BREW /pot HTTP/1.1\r\nHost: a\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 4\r\n\r\n")
def test_request_heads_agree_with_h11(head: bytes) -> None:
    assert_agree(ours_request(head), h11_request(head), head)


def test_what_we_refuse_beyond_h11_is_refused() -> None:
    """The shapes ``stricter`` names: h11 took them, we refuse each with a 4xx/5xx."""
    for head in [
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 4\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    ]:
        assert isinstance(h11_request(head), Parsed), head
        assert ours_request(head) in STRICTER_STATUS, head
        assert stricter(head) is not None, head


# Responses, read as the ingress reads a private service's.


def h11_response(head: bytes, method: bytes) -> Outcome:
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=http1.MAX_HEAD)
    connection.send(h11.Request(method=method, target="/", headers=[("Host", "a")]))
    connection.send(h11.EndOfMessage())
    event = h11_event(connection, head, both_lengths=502)
    if event is None or isinstance(event, int):
        return event
    assert isinstance(event, h11.Response | h11.InformationalResponse), event
    names = [name for name, _ in event.headers]
    headers = _normalised(event.headers)
    body = _h11_body(headers)
    if event.status_code < 200 or event.status_code in (204, 304) or method == b"HEAD":
        body = 0
    elif b"content-length" not in names and b"transfer-encoding" not in names:
        body = http1.UNTIL_CLOSE
    return Parsed(b"", str(event.status_code).encode(), event.http_version, headers, body)


def ours_response(head: bytes, method: bytes) -> Outcome:
    reader = http1.ResponseReader()
    reader.for_head = method == b"HEAD"
    return ours(reader, head)


@st.composite
def response_heads(draw: st.DrawFn) -> bytes:
    status = draw(st.sampled_from([b"200", b"204", b"304", b"100", b"103", b"404", b"20", b"2000"]))
    reason = draw(st.sampled_from([b" OK", b" ", b"", b" Not\tFound", b" \xffobs", b" a\x00b"]))
    head = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0"])) + b" " + status + reason
    head += draw(LINE_ENDS)
    for _ in range(draw(st.integers(0, 4))):
        head += draw(NAMES) + draw(SEPARATORS) + draw(VALUES) + draw(LINE_ENDS)
    return head + draw(st.sampled_from([b"\r\n"] * 5 + [b"\n", b""]))


@fuzz_settings(500)
@given(response_heads(), st.sampled_from([b"GET", b"HEAD"]))
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", b"GET")
@example(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", b"GET")
@example(b"HTTP/1.0 200 OK\r\n\r\n", b"GET")
@example(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", b"GET")
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", b"HEAD")
def test_response_heads_agree_with_h11(head: bytes, method: bytes) -> None:
    ours, theirs = ours_response(head, method), h11_response(head, method)
    if isinstance(theirs, Parsed) and not isinstance(ours, Parsed):
        assert stricter(head) is not None, f"we refuse what h11 accepts: {head!r}"
    elif isinstance(theirs, int):
        assert isinstance(ours, int), f"we accept what h11 refuses: {head!r} {ours}"
    else:
        assert ours == theirs, head


# Bodies: Content-Length and chunked, whole and cut, well-formed and not.


def h11_body(message: bytes) -> tuple[bytes, str]:
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(message)
    connection.receive_data(b"")
    received = b""
    try:
        while True:
            event = connection.next_event()
            if isinstance(event, h11.Data):
                received += event.data
            elif isinstance(event, h11.EndOfMessage):
                return received, "end"
            elif not isinstance(event, h11.Request):
                return received, "incomplete"
    except h11.RemoteProtocolError:
        return received, "refused"


def ours_body(message: bytes, piece: int) -> tuple[bytes, str]:
    """Fed ``piece`` bytes at a time, as reads may cut a body anywhere."""
    reader = http1.RequestReader()
    received = b""
    chunks = [message[i : i + piece] for i in range(0, len(message), piece)] + [b""]
    try:
        for data in chunks:
            reader.receive_data(data)
            while (event := reader.next_event()) is not http1.NEED_DATA:
                if isinstance(event, bytes):
                    received += event
                elif event is http1.END:
                    return received, "end"
    except http1.ProtocolError:
        return received, "refused"
    return received, "incomplete"


CHUNK_PIECES = st.sampled_from(
    [
        *(b"5\r\nhello\r\n", b"0\r\n\r\n", b"5;ext=1\r\nhello\r\n", b"A\r\n0123456789\r\n"),
        *(b"a \r\n", b"zz\r\n", b"5\r\nhelloXX", b"5\nhello\n", b"-1\r\n", b"\r\n", b"5\r\nhel"),
        *(b"0\r\nTrailer: x\r\n\r\n", b"0\r\nBad Trailer\r\n\r\n", b"1" * 21 + b"\r\n"),
    ]
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        return head + b"".join(draw(st.lists(CHUNK_PIECES, max_size=5)))
    length = draw(st.integers(0, 20))
    body = draw(st.binary(max_size=25))
    return b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s" % (length, body)


@fuzz_settings(500)
@given(bodies(), st.integers(1, 9))
@example(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 64)
def test_bodies_agree_with_h11(message: bytes, piece: int) -> None:
    theirs = h11_body(message)
    ours = ours_body(message, piece)
    assert ours[1] == theirs[1], message
    if ours[1] == "end":
        assert ours[0] == theirs[0], message


@pytest.mark.parametrize("piece", [1, 2, 7, 1000])
def test_pipelined_requests_come_one_by_one_and_the_rest_stays_pending(piece: int) -> None:
    message = (
        b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        b"GET /b HTTP/1.1\r\nHost: b\r\n\r\nXYZ"
    )
    reader = http1.RequestReader()
    events: list[http1.Event] = []
    for start in range(0, len(message), piece):
        reader.receive_data(message[start : start + piece])
        while events.count(http1.END) < 2 and (event := reader.next_event()) is not http1.NEED_DATA:
            events.append(event)
            if event is http1.END and events.count(http1.END) < 2:
                reader.next_message()
    targets = [event.target for event in events if isinstance(event, http1.Request)]
    assert targets == [b"/a", b"/b"]
    assert b"".join(event for event in events if isinstance(event, bytes)) == b"abc"
    assert reader.pending == b"XYZ"


@pytest.mark.parametrize("status", [b"000", b"099", b"042"])
def test_a_status_under_100_is_refused(status: bytes) -> None:
    """h11 refused them; passing one on would send the caller a malformed status line."""
    reader = http1.ResponseReader()
    reader.receive_data(b"HTTP/1.1 " + status + b" x\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(http1.ProtocolError, match="is not an HTTP status"):
        reader.next_event()
