"""The public HTTP ingress in memory: routing by Host, error statuses, header rewriting.

Each registration is served by a real, handshaken TunnelSession pair whose client handler
speaks HTTP/1.1 itself (h11) over the tunnel stream, standing in for the private service.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial

import h11
import pytest
import trio
import trio.testing

from petit.errors import ErrorCode
from petit.session import StreamHandler, TunnelStream
from petit_server.edge.hub import Attachment, Hub
from petit_server.edge.ingress import (
    UNAVAILABLE_BODY,
    ConnectionLimits,
    IngressConnection,
    Routing,
    _rate_key,
    serve_ingress,
)
from petit_server.policy import Policy
from petit_server.registry.base import registration_id_for_host
from petit_server.usage import UsageStore
from tests.integration.harness import wait_until
from tests.proto.helpers import proxy_v2

from .helpers import session_pair

TIMEOUT = 10  # seconds bounding each test
PEER_IP = "203.0.113.9"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("1001.localhost", "1001"),
        ("1001-x.example.com", "1001"),
        ("1001.localhost:8090", "1001"),
        ("1001-app.localhost:8090", "1001"),
        ("  1001.LOCALHOST ", "1001"),
        ("[::1]:8090", None),
        ("abc.localhost", None),
        ("0123.x", None),
        ("1001", None),
        ("localhost:1001", None),
        ("", None),
    ],
)
def test_registration_id_for_host(host: str, expected: str | None) -> None:
    assert registration_id_for_host(host) == expected


# In-memory ingress.


async def next_http_event(http: h11.Connection, stream: trio.abc.ReceiveStream) -> h11.Event:
    while True:
        event = http.next_event()
        if event is h11.NEED_DATA:
            http.receive_data(bytes(await stream.receive_some()))
            continue
        assert isinstance(event, h11.Event)
        return event


async def send_http(
    http: h11.Connection, stream: trio.abc.SendStream, events: Iterable[h11.Event]
) -> None:
    for event in events:
        if data := http.send(event):
            await stream.send_all(data)


@dataclass(frozen=True)
class SeenRequest:
    """A request as the private service received it."""

    backend: str
    target: str  # the registration the tunnel stream was opened for
    method: bytes
    path: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key == name]


@dataclass
class HttpBackend:
    """A client stream handler that is the private service: it answers HTTP on the stream."""

    name: str
    seen: list[SeenRequest] = field(default_factory=list)

    async def __call__(self, stream: TunnelStream, target: str) -> None:
        stream.accept()
        http = h11.Connection(h11.SERVER)
        with contextlib.suppress(trio.BrokenResourceError):
            while isinstance(request := await next_http_event(http, stream), h11.Request):
                body = bytearray()
                while isinstance(event := await next_http_event(http, stream), h11.Data):
                    body += event.data
                self.seen.append(
                    SeenRequest(
                        self.name,
                        target,
                        request.method,
                        request.target,
                        list(request.headers),
                        bytes(body),
                    )
                )
                reply = self.name.encode() + b" " + request.target + b" " + bytes(body)
                await send_http(
                    http,
                    stream,
                    [
                        h11.Response(
                            status_code=200,
                            headers=[
                                (b"content-length", str(len(reply)).encode()),
                                (b"connection", b"keep-alive, x-backend-hop"),
                                (b"x-backend-hop", b"dropped"),
                            ],
                        ),
                        h11.Data(data=reply),
                        h11.EndOfMessage(),
                    ],
                )
                if http.our_state is not h11.DONE or http.their_state is not h11.DONE:
                    return
                http.start_next_cycle()


async def refuse(stream: TunnelStream, target: str) -> None:
    stream.refuse(ErrorCode.REFUSED)


async def hang(stream: TunnelStream, target: str) -> None:
    """A private service that takes every request and answers none."""
    stream.accept()
    await trio.sleep_forever()


SLOW_BODY_DELAY = 120  # seconds between a response's head and its body, from 1006


async def slow_body(stream: TunnelStream, target: str) -> None:
    """A private service that answers its first request's head at once and its body late."""
    stream.accept()
    await stream.receive_some()  # the request
    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
    await trio.sleep(SLOW_BODY_DELAY)
    await stream.send_all(b"done")
    await trio.sleep_forever()


@dataclass
class Site:
    """Registrations 1001 and 1002 served by their own backends; 1003 registered but offline;
    1004 served by a client that cannot reach its private service; 1005 by one that never
    answers; 1006 by one whose body comes ``SLOW_BODY_DELAY`` after its head."""

    routing: Routing
    backends: dict[str, HttpBackend]

    @property
    def all_seen(self) -> list[SeenRequest]:
        return [seen for backend in self.backends.values() for seen in backend.seen]


async def start_site(nursery: trio.Nursery) -> Site:
    backends = {"1001": HttpBackend("A"), "1002": HttpBackend("B")}
    hub = Hub()
    handlers: dict[str, StreamHandler] = {
        **backends,
        "1004": refuse,
        "1005": hang,
        "1006": slow_body,
    }
    for rid, handler in handlers.items():
        session = (await session_pair(nursery, handler=handler)).server.session
        hub.attach(Attachment(session, [rid], remote="test", vitae={}))
    registered = {"1001", "1002", "1003", "1004", "1005", "1006"}

    def route(host: str) -> str | None:
        registration_id = registration_id_for_host(host)
        return registration_id if registration_id in registered else None

    routing = Routing(
        route=route,
        open_upstream=hub.open_stream,
        open_timeout=5,
        header_timeout=5,
        usage=UsageStore(),
    )
    return Site(routing, backends)


async def connect(nursery: trio.Nursery, site: Site) -> trio.abc.Stream:
    """A caller's connection to the ingress; the ingress closes it when done, as in service."""
    caller, public = trio.testing.memory_stream_pair()

    async def serve_public() -> None:
        try:
            await IngressConnection(public, site.routing, PEER_IP).run()
        finally:
            await trio.aclose_forcefully(public)

    nursery.start_soon(serve_public)
    return caller


class Caller:
    """An HTTP/1.1 client on one public connection."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.http = h11.Connection(h11.CLIENT)

    async def request(
        self,
        host: str,
        path: bytes = b"/",
        *,
        method: bytes = b"GET",
        headers: Iterable[tuple[bytes, bytes]] = (),
        body: bytes = b"",
    ) -> tuple[h11.Response, bytes]:
        if self.http.our_state is h11.DONE:
            self.http.start_next_cycle()
        all_headers = [(b"host", host.encode()), *headers]
        if body:
            all_headers.append((b"content-length", str(len(body)).encode()))
        events: list[h11.Event] = [h11.Request(method=method, target=path, headers=all_headers)]
        if body:
            events.append(h11.Data(data=body))
        await send_http(self.http, self.stream, [*events, h11.EndOfMessage()])
        response = await next_http_event(self.http, self.stream)
        assert isinstance(response, h11.Response)
        received = bytearray()
        while isinstance(event := await next_http_event(self.http, self.stream), h11.Data):
            received += event.data
        assert isinstance(event, h11.EndOfMessage)
        return response, bytes(received)


async def test_request_is_routed_to_its_registration() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site = await start_site(nursery)
            caller = Caller(await connect(nursery, site))
            response, body = await caller.request(
                "1001.localhost:8090", b"/orders?id=7", method=b"POST", body=b"payload"
            )
            assert response.status_code == 200
            assert body == b"A /orders?id=7 payload"
            (seen,) = site.all_seen
            assert (seen.backend, seen.target, seen.method, seen.path, seen.body) == (
                "A",
                "1001",
                b"POST",
                b"/orders?id=7",
                b"payload",
            )
            # The private service's own hop-by-hop headers stop at the ingress too.
            names = {name for name, _ in response.headers}
            assert b"x-backend-hop" not in names
            assert b"connection" not in names
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("9999.localhost", 404),  # not registered
        ("www.localhost", 404),  # no registration ID in the name
        ("1003.localhost", 503),  # registered, but no tunnel is connected
        ("1004.localhost", 502),  # the client could not reach its private service
    ],
)
async def test_unroutable_requests_get_an_error_status(host: str, status: int) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site = await start_site(nursery)
            caller = Caller(await connect(nursery, site))
            response, body = await caller.request(host)
            assert response.status_code == status
            assert body == UNAVAILABLE_BODY
            # The connection stays usable: the next request is served.
            response, body = await caller.request("1001.localhost")
            assert response.status_code == 200
            assert body == b"A / "
            assert [seen.backend for seen in site.all_seen] == ["A"]
            nursery.cancel_scope.cancel()


async def test_content_length_with_transfer_encoding_is_refused() -> None:
    smuggling = (
        b"POST / HTTP/1.1\r\nHost: 1001.localhost\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        b"GET /admin HTTP/1.1\r\nHost: 1001.localhost\r\n\r\n"
    )
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site = await start_site(nursery)
            stream = await connect(nursery, site)
            await stream.send_all(smuggling)
            received = bytearray()
            while chunk := await stream.receive_some():  # the ingress closes the connection
                received += chunk
            assert received.startswith(b"HTTP/1.1 400 ")
            assert received.count(b"HTTP/1.1") == 1
            assert site.all_seen == []
            nursery.cancel_scope.cancel()


async def test_forwarded_headers_are_added_and_hop_by_hop_headers_stripped() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site = await start_site(nursery)
            caller = Caller(await connect(nursery, site))
            response, _ = await caller.request(
                "1001-shop.example.com",
                headers=[
                    (b"connection", b"foo, keep-alive"),
                    (b"foo", b"hop"),
                    (b"keep-alive", b"timeout=5"),
                    (b"te", b"trailers"),
                    *SPOOFED,
                    (b"x-custom", b"kept"),
                ],
            )
            assert response.status_code == 200
            (seen,) = site.all_seen
            # The caller is not a trusted proxy: what it says of itself is replaced by ours.
            assert seen.header(b"x-forwarded-for") == [PEER_IP.encode()]
            assert seen.header(b"x-forwarded-proto") == [b"http"]
            assert seen.header(b"x-forwarded-host") == [b"1001-shop.example.com"]
            assert seen.header(b"host") == [b"1001-shop.example.com"]
            assert seen.header(b"x-custom") == [b"kept"]
            for hop in (b"connection", b"foo", b"keep-alive", b"te"):
                assert seen.header(hop) == [], hop
            for name, _ in SPOOFED[3:]:
                assert seen.header(name) == [], name
            nursery.cancel_scope.cancel()


SPOOFED = [
    (b"x-forwarded-for", b"198.51.100.7"),
    (b"x-forwarded-host", b"spoofed.example"),
    (b"x-forwarded-proto", b"https"),
    (b"forwarded", b"for=198.51.100.7;proto=https"),
    (b"x-real-ip", b"198.51.100.7"),
    (b"true-client-ip", b"198.51.100.7"),
    (b"x_forwarded_for", b"198.51.100.7"),
    (b"x-forwarded-port", b"443"),
]


async def test_a_trusted_proxys_forwarding_headers_are_kept_and_extended() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site = await start_site(nursery)
            trusted = ipaddress.ip_network("203.0.113.0/24")  # PEER_IP's
            site = Site(
                dataclasses.replace(site.routing, trusted_proxies=(trusted,)), site.backends
            )
            caller = Caller(await connect(nursery, site))
            response, _ = await caller.request("1001.localhost", headers=SPOOFED)
            assert response.status_code == 200
            (seen,) = site.all_seen
            assert seen.header(b"x-forwarded-for") == [b"198.51.100.7, " + PEER_IP.encode()]
            assert seen.header(b"x-forwarded-proto") == [b"https"]
            assert seen.header(b"x-forwarded-host") == [b"spoofed.example"]
            assert seen.header(b"forwarded") == [b"for=198.51.100.7;proto=https"]
            assert seen.header(b"x-real-ip") == [b"198.51.100.7"]
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "host",
    [b"1001.localhost@evil", b"1001.localhost/evil", b"1001.localhost:99999", b"", b"a" * 300],
)
async def test_an_invalid_host_gets_400_and_reaches_no_backend(host: bytes) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site = await start_site(nursery)
            request = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
            answer = await raw_exchange(site, nursery, request)
            assert answer.startswith(b"HTTP/1.1 400 "), answer
            assert site.all_seen == []
            nursery.cancel_scope.cancel()


async def test_keep_alive_routes_each_request_by_its_own_host() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site = await start_site(nursery)
            caller = Caller(await connect(nursery, site))
            answers = []
            for host, path in [
                ("1001.localhost", b"/first"),
                ("1002-app.localhost", b"/second"),
                ("1001.localhost", b"/third"),
                ("1001.localhost", b"/fourth"),
            ]:
                response, body = await caller.request(host, path)
                assert response.status_code == 200
                answers.append(body)
            assert answers == [b"A /first ", b"B /second ", b"A /third ", b"A /fourth "]
            assert [(s.target, s.path) for s in site.backends["1001"].seen] == [
                ("1001", b"/first"),
                ("1001", b"/third"),
                ("1001", b"/fourth"),
            ]
            assert [(s.target, s.path) for s in site.backends["1002"].seen] == [
                ("1002", b"/second")
            ]
            nursery.cancel_scope.cancel()


async def test_pipelined_requests_each_count_their_own_bytes() -> None:
    first = b"GET /first HTTP/1.1\r\nHost: 1001.localhost\r\n\r\n"
    second = b"GET /second-and-longer HTTP/1.1\r\nHost: 1002.localhost\r\n\r\n"
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site = await start_site(nursery)
            caller = await connect(nursery, site)
            await caller.send_all(first + second)  # one read: the second is read ahead
            answers = b""
            while b"B /second-and-longer" not in answers:
                answers += await caller.receive_some()
            nursery.cancel_scope.cancel()
    usage = site.routing.usage
    assert usage is not None
    assert usage.of("1001").bytes_in == len(first)
    assert usage.of("1002").bytes_in == len(second)


async def raw_exchange(site: Site, nursery: trio.Nursery, request: bytes) -> bytes:
    """Send raw bytes on a new public connection; all the ingress answers until it closes."""
    stream = await connect(nursery, site)
    await stream.send_all(request)
    received = bytearray()
    while chunk := await stream.receive_some():
        received += chunk
    return bytes(received)


async def test_an_absolute_form_target_routes_by_its_own_authority() -> None:
    """RFC 9112: the target's authority wins over Host; the backend gets origin-form and the
    authority that routed it, so a target cannot pick another virtual host behind 1001."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site = await start_site(nursery)
            caller = Caller(await connect(nursery, site))
            response, _ = await caller.request(
                "1001.localhost", b"http://1002.localhost:8090/secret?x=1"
            )
            assert response.status_code == 200
            (seen,) = site.all_seen
            assert (seen.backend, seen.path) == ("B", b"/secret?x=1")
            assert seen.header(b"host") == [b"1002.localhost:8090"]
            assert seen.header(b"x-forwarded-host") == [b"1002.localhost:8090"]
            response, _ = await caller.request("1001.localhost", b"http://internal-admin.corp/x")
            assert response.status_code == 404
            assert len(site.all_seen) == 1
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"CONNECT 1001.localhost:443 HTTP/1.1\r\nHost: 1001.localhost:443\r\n\r\n", b"405"),
        (b"GET / HTTP/1.1\r\nHost: 1001.localhost\r\nConnection: host\r\n\r\n", b"400"),
        (
            b"POST / HTTP/1.1\r\nHost: 1001.localhost\r\nContent-Length: 2\r\n"
            b"Connection: content-length\r\n\r\nhi",
            b"400",
        ),
        (b"GET http://user@1001.localhost/ HTTP/1.1\r\nHost: 1001.localhost\r\n\r\n", b"400"),
        # Only origin-form, http(s) absolute-form and OPTIONS * go on: a ws:// target passed
        # as it is would let some servers take its host for the request's.
        (b"GET ws://internal-admin.corp/x HTTP/1.1\r\nHost: 1001.localhost\r\n\r\n", b"400"),
        (b"GET x HTTP/1.1\r\nHost: 1001.localhost\r\n\r\n", b"400"),
    ],
    ids=[
        "connect",
        "connection-host",
        "connection-content-length",
        "userinfo",
        "ws-absolute-form",
        "no-slash",
    ],
)
async def test_requests_we_cannot_pass_on_faithfully_get_a_4xx(
    request_bytes: bytes, status: bytes
) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site = await start_site(nursery)
            answer = await raw_exchange(site, nursery, request_bytes)
            assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer
            assert site.all_seen == []
            # and the ingress still serves the next caller
            response, _ = await Caller(await connect(nursery, site)).request("1001.localhost")
            assert response.status_code == 200
            nursery.cancel_scope.cancel()


def answering(raw: bytes) -> StreamHandler:
    """A private service that answers any request with ``raw``, then holds the stream."""

    async def answer(stream: TunnelStream, target: str) -> None:
        stream.accept()
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some()
        await stream.send_all(raw)
        await trio.sleep_forever()

    return answer


async def served_by(raw: bytes, requests: int = 1) -> list[tuple[h11.Response, bytes]]:
    """What a caller's ``requests`` on one connection get from a registration whose service
    answers each request (on each stream) with ``raw``."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site = await start_site(nursery)
            hub = Hub()
            session = (await session_pair(nursery, handler=answering(raw))).server.session
            hub.attach(Attachment(session, ["1001"], remote="test", vitae={}))
            routing = dataclasses.replace(site.routing, open_upstream=hub.open_stream)
            caller = Caller(await connect(nursery, Site(routing, site.backends)))
            answers = [await caller.request("1001.localhost") for _ in range(requests)]
            nursery.cancel_scope.cancel()
    return answers


async def test_bytes_a_service_sends_past_its_answer_never_answer_the_next_request() -> None:
    """A service that sends a second response nobody asked for: the stream is not reused,
    so the caller's next request gets its own answer, not the stray one."""
    stray = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray"
    )
    assert [body for _, body in await served_by(stray, requests=2)] == [b"ok", b"ok"]


async def test_a_backend_answer_with_both_lengths_becomes_502() -> None:
    """A response framed two ways could desync the caller: none of it is relayed."""
    ((response, body),) = await served_by(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nHTTP/1.1 200 OK\r\n"
    )
    assert (response.status_code, body) == (502, UNAVAILABLE_BODY)


async def test_a_service_that_drops_an_upload_gets_its_caller_a_502_not_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The tunnel stream dies while the caller's body is going up it: the caller is told
    502, and nothing is logged as a bug."""

    async def drop_after_the_head(stream: TunnelStream, target: str) -> None:
        stream.accept()
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some()
        await stream.aclose()  # the service vanished mid-upload: RESET(CANCEL) to the server

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site = await start_site(nursery)
            hub = Hub()
            pair = await session_pair(nursery, handler=drop_after_the_head)
            hub.attach(Attachment(pair.server.session, ["1001"], remote="test", vitae={}))
            routing = dataclasses.replace(site.routing, open_upstream=hub.open_stream)
            caller = await connect(nursery, Site(routing, site.backends))
            await caller.send_all(
                b"POST / HTTP/1.1\r\nHost: 1001.localhost\r\nContent-Length: 4000000\r\n\r\n"
            )
            with contextlib.suppress(trio.BrokenResourceError):
                for _ in range(1000):  # a bounded upload, cut short by the answer
                    await caller.send_all(bytes(4000))
            answer = await read_until_closed(caller)
            assert answer.startswith(b"HTTP/1.1 502 "), answer[:100]
            nursery.cancel_scope.cancel()
    assert not [r for r in caplog.records if r.getMessage().startswith("bug while")]


async def test_a_connection_header_naming_the_length_does_not_unframe_the_answer() -> None:
    """Connection: content-length from a service must not strip the caller's framing."""
    ((response, body),) = await served_by(
        b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello"
    )
    assert (response.status_code, body) == (200, b"hello")
    assert (b"content-length", b"5") in response.headers


async def test_connections_past_the_limits_are_refused_and_others_still_served() -> None:
    """Per source address and in total: past either, a new connection gets a 503 at once and
    its request reaches no backend; a freed place is taken again."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site = await start_site(nursery)
            limits = ConnectionLimits(total=10, per_address=2)
            routing = dataclasses.replace(site.routing, limits=limits)
            port = await nursery.start(
                partial(serve_ingress, routing, host="127.0.0.1", port=0, handler_nursery=nursery)
            )
            held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
            await wait_until(lambda: limits.open == 2, TIMEOUT, what="two connections admitted")
            async with await trio.open_tcp_stream("127.0.0.1", port) as third:
                await third.send_all(b"GET / HTTP/1.1\r\nHost: 1001.localhost\r\n\r\n")
                answer = bytearray()
                while chunk := await third.receive_some():
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
            assert answer.endswith(UNAVAILABLE_BODY)
            assert site.all_seen == []
            await held.pop().aclose()
            await wait_until(lambda: limits.open == 1, TIMEOUT, what="the place to be freed")
            caller = Caller(await trio.open_tcp_stream("127.0.0.1", port))
            response, _ = await caller.request("1001.localhost")
            assert response.status_code == 200
            await caller.stream.aclose()
            await held.pop().aclose()
            nursery.cancel_scope.cancel()


async def test_the_upstream_stream_knows_the_callers_socket() -> None:
    """The tunnel stream a public connection opens is told the socket its response bytes
    go into: the session reads that socket's send queue before it grows the window."""
    opened: list[trio.abc.HalfCloseableStream] = []
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site = await start_site(nursery)

            async def open_upstream(target: str) -> trio.abc.HalfCloseableStream:
                opened.append(await site.routing.open_upstream(target))
                return opened[-1]

            routing = dataclasses.replace(site.routing, open_upstream=open_upstream)
            port = await nursery.start(
                partial(serve_ingress, routing, host="127.0.0.1", port=0, handler_nursery=nursery)
            )
            connection = await trio.open_tcp_stream("127.0.0.1", port)
            response, _ = await Caller(connection).request("1001.localhost")
            assert response.status_code == 200
            (upstream,) = opened
            assert isinstance(upstream, TunnelStream)
            assert upstream.drain is not None
            assert upstream.drain.getpeername() == connection.socket.getsockname()
            await connection.aclose()
            nursery.cancel_scope.cancel()


async def test_a_bug_a_caller_can_trigger_at_will_logs_one_traceback_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug reached by every request (here: opening the upstream raises) costs each caller
    its connection, and the log one traceback per interval, not one per caller."""

    async def buggy_upstream(*_: object) -> trio.abc.HalfCloseableStream:
        raise RuntimeError("a bug in opening the upstream")

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site = await start_site(nursery)
            routing = dataclasses.replace(site.routing, open_upstream=buggy_upstream)
            port = await nursery.start(
                partial(serve_ingress, routing, host="127.0.0.1", port=0, handler_nursery=nursery)
            )
            for _ in range(20):
                async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                    await stream.send_all(b"GET / HTTP/1.1\r\nHost: 1001.localhost\r\n\r\n")
                    with contextlib.suppress(trio.BrokenResourceError):
                        while await stream.receive_some():
                            pass  # until the ingress drops the connection
            await wait_until(lambda: routing.limits.open == 0, TIMEOUT, what="all 20 released")
            nursery.cancel_scope.cancel()
    bugs = [r for r in caplog.records if r.getMessage().startswith("bug while serving")]
    assert len(bugs) == 1
    assert bugs[0].exc_info is not None
    assert "a bug in opening the upstream" in str(bugs[0].exc_info[1])


@pytest.mark.parametrize(
    ("trusted", "forwarded_for", "status"),
    [
        (False, b"198.51.100.7", 403),  # an untrusted peer's X-Forwarded-For is not believed
        (True, b"198.51.100.7", 200),  # behind our proxy: the visitor it names
        (True, b"198.51.100.7, 203.0.113.5", 403),  # the nearest hop it did not add wins
        (True, b"198.51.100.7, 203.0.113.9", 200),  # a trusted hop is skipped
        (True, None, 403),  # nothing forwarded: the proxy itself is the visitor
    ],
)
async def test_visitor_lists_judge_the_caller_a_trusted_proxy_names(
    trusted: bool, forwarded_for: bytes | None, status: int
) -> None:
    allow = Policy().changed({"allow": "198.51.100.0/24"})
    proxy = ipaddress.ip_network(f"{PEER_IP}/32")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site = await start_site(nursery)
            routing = dataclasses.replace(
                site.routing,
                policy_of=lambda _: allow,
                trusted_proxies=(proxy,) if trusted else (),
            )
            caller = Caller(await connect(nursery, Site(routing, site.backends)))
            headers = [] if forwarded_for is None else [(b"x-forwarded-for", forwarded_for)]
            response, _ = await caller.request("1001.localhost", headers=headers)
            assert response.status_code == status
            assert len(site.all_seen) == (status == 200)
            nursery.cancel_scope.cancel()


async def read_until_closed(stream: trio.abc.Stream) -> bytes:
    received = b""
    with contextlib.suppress(trio.BrokenResourceError):
        while chunk := await stream.receive_some():
            received += chunk
    return received


@pytest.mark.parametrize(
    ("head", "status"),
    [
        # A body announced and never sent, for a Host nobody holds.
        (b"POST / HTTP/1.1\r\nHost: nobody.localhost\r\nContent-Length: 1000000\r\n\r\n", 404),
        # A body past the registration's maximum, its caller waiting for a 100 first.
        (
            b"POST / HTTP/1.1\r\nHost: 1001.localhost\r\nContent-Length: 5000\r\n"
            b"Expect: 100-continue\r\n\r\n",
            413,
        ),
    ],
)
async def test_a_refused_request_whose_body_never_comes_is_answered_and_closed_in_time(
    head: bytes, status: int, autojump_clock: trio.testing.MockClock
) -> None:
    """Dropping a refused request's body is bounded by headerTimeout, and a caller waiting
    for a 100 is answered at once: neither holds a connection for ever."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site = await start_site(nursery)
            routing = dataclasses.replace(
                site.routing, policy_of=lambda _: Policy().changed({"maxRequestBody": 1000})
            )
            caller = await connect(nursery, Site(routing, site.backends))
            started = trio.current_time()
            await caller.send_all(head)
            answer = await read_until_closed(caller)
            assert answer.startswith(b"HTTP/1.1 %d " % status), answer
            assert trio.current_time() - started <= routing.header_timeout
            assert site.all_seen == []
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("sent", "timeout", "answer"),
    [
        (b"", "idle_timeout", b""),  # no request at all: closed without a word
        (b"GET / HTTP/1.1\r\nHost: 1001.loc", "header_timeout", b"HTTP/1.1 408 "),
        (b"GET / HTTP/1.1\r\nHost: 1005.localhost\r\n\r\n", "response_timeout", b"HTTP/1.1 504 "),
    ],
)
async def test_each_wait_ends_at_its_own_timeout_with_its_answer(
    sent: bytes, timeout: str, answer: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    """The wait for a request, for the rest of its head and for the response head each end
    at their own timeout, not sooner: answered as each says, then the connection closes."""
    async with trio.open_nursery() as nursery:
        site = await start_site(nursery)
        routing = dataclasses.replace(
            site.routing, header_timeout=5, response_timeout=60, idle_timeout=75
        )
        with trio.fail_after(TIMEOUT + getattr(routing, timeout)):
            caller = await connect(nursery, Site(routing, site.backends))
            started = trio.current_time()
            await caller.send_all(sent)
            received = await read_until_closed(caller)
        assert trio.current_time() - started == pytest.approx(getattr(routing, timeout))
        assert received.startswith(answer), received
        assert (b"\r\nconnection: close\r\n" in received.lower()) == bool(answer), received
        nursery.cancel_scope.cancel()


async def test_a_response_timeout_during_an_upload_is_answered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A 504 still goes out when the caller had not sent its whole body: what came is
    discarded within headerTimeout, then the answer."""
    async with trio.open_nursery() as nursery:
        site = await start_site(nursery)
        routing = dataclasses.replace(site.routing, header_timeout=5, response_timeout=60)
        caller = await connect(nursery, Site(routing, site.backends))
        started = trio.current_time()
        with trio.fail_after(TIMEOUT + 65):
            await caller.send_all(
                b"POST / HTTP/1.1\r\nHost: 1005.localhost\r\nContent-Length: 100\r\n\r\n"
                + b"x" * 10
            )
            received = await read_until_closed(caller)
        assert received.startswith(b"HTTP/1.1 504 "), received
        assert trio.current_time() - started == pytest.approx(65)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("request_head", "answer"),
    [
        (b"GET / HTTP/1.1\r\nHost: 1001.localhost\r\n\r\n", b""),
        # The caller holds its body for a 100, which comes with the final head: a 504 then
        # must not wait headerTimeout for a body the caller was never told to send.
        (
            b"POST / HTTP/1.1\r\nHost: 1001.localhost\r\nContent-Length: 2\r\n"
            b"Expect: 100-continue\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n",
        ),
    ],
)
async def test_a_response_that_comes_as_its_timeout_expires_is_answered_once(
    request_head: bytes, answer: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    """The watchdog can expire the response wait in the scheduling batch in which the
    response woke the connection: the caller then gets one answer, a 504 at the timeout,
    never the response (or its 100) followed by a 504, which a keep-alive client would take
    for its next request's answer. The two orders of that batch come at random, so the race
    is run many times."""
    received: list[tuple[float, bytes]] = []
    async with trio.open_nursery() as nursery:

        async def open_upstream(target: str) -> trio.abc.HalfCloseableStream:
            requests = trio.testing.MemorySendStream()
            responses = trio.testing.MemoryReceiveStream()

            async def answer_at_the_timeout() -> None:
                await requests.get_data()  # the request, when the wait begins
                await trio.sleep(RESPONSE_TIMEOUT)
                # Woken with the watchdog, this wakes the connection without a checkpoint.
                with contextlib.suppress(trio.ClosedResourceError):  # (the 504 closed it)
                    responses.put_data(answer + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

            nursery.start_soon(answer_at_the_timeout)
            return trio.StapledStream(requests, responses)

        routing = Routing(
            route=lambda host: "1001",
            open_upstream=open_upstream,
            open_timeout=5,
            header_timeout=5,
            response_timeout=RESPONSE_TIMEOUT,
        )
        for _ in range(RACES):
            ours, theirs = trio.socket.socketpair()  # a real socket: its send is no checkpoint
            caller, public = trio.SocketStream(ours), trio.SocketStream(theirs)

            async def serve(public: trio.SocketStream) -> None:
                try:
                    await IngressConnection(public, routing, PEER_IP).run()
                finally:
                    await trio.aclose_forcefully(public)

            with trio.fail_after(TIMEOUT + RESPONSE_TIMEOUT):
                async with trio.open_nursery() as connection:
                    connection.start_soon(serve, public)
                    started = trio.current_time()
                    await caller.send_all(request_head)
                    answered = await read_until_closed(caller)
                    received.append((trio.current_time() - started, answered))
            await caller.aclose()
        nursery.cancel_scope.cancel()
    answers = [(round(after, 3), got.count(b"HTTP/1.1 "), got[:13]) for after, got in received]
    assert answers == [(RESPONSE_TIMEOUT, 1, b"HTTP/1.1 504 ")] * RACES, received


RESPONSE_TIMEOUT = 60.0  # seconds, in the race above
RACES = 16  # a broken ingress answers twice in about half of them


async def test_a_connection_in_use_outlives_its_timeouts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Each wait is timed from its own start: requests that each come within idleTimeout of
    the last keep one connection for many idleTimeouts."""
    async with trio.open_nursery() as nursery:
        site = await start_site(nursery)
        routing = dataclasses.replace(site.routing, response_timeout=60, idle_timeout=75)
        caller = Caller(await connect(nursery, Site(routing, site.backends)))
        with trio.fail_after(TIMEOUT + 10 * routing.idle_timeout):
            for _ in range(8):
                await trio.sleep(0.9 * routing.idle_timeout)  # the silence under test
                response, body = await caller.request("1001.localhost", b"/again")
                assert (response.status_code, body) == (200, b"A /again "), response
        nursery.cancel_scope.cancel()


async def test_a_body_may_take_longer_than_the_response_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """responseTimeout bounds the wait for a response's head; its body may take its time."""
    async with trio.open_nursery() as nursery:
        site = await start_site(nursery)
        routing = dataclasses.replace(site.routing, response_timeout=SLOW_BODY_DELAY / 2)
        caller = Caller(await connect(nursery, Site(routing, site.backends)))
        with trio.fail_after(TIMEOUT + SLOW_BODY_DELAY):
            response, body = await caller.request("1006.localhost")
        assert (response.status_code, body) == (200, b"done"), response
        nursery.cancel_scope.cancel()


async def test_an_http10_chunked_request_never_keeps_its_connection() -> None:
    """RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message closes the connection after
    it, whatever its Connection header asks (a front proxy may have framed it otherwise)."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site = await start_site(nursery)
            caller = await connect(nursery, site)
            await caller.send_all(
                b"POST / HTTP/1.0\r\nHost: 1001.localhost\r\nConnection: keep-alive\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            )
            answer = await read_until_closed(caller)  # returns: the ingress closed it
            assert answer.startswith(b"HTTP/1.1 200 "), answer
            assert b"connection: keep-alive" not in answer.lower()
            nursery.cancel_scope.cancel()


# The PROXY protocol, over real loopback sockets: 127.0.0.1 stands for the load balancer.

LOOPBACK = ipaddress.ip_network("127.0.0.1/32")


async def start_proxied_ingress(
    nursery: trio.Nursery,
    *,
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (LOOPBACK,),
    limits: ConnectionLimits | None = None,
) -> tuple[Site, int]:
    site = await start_site(nursery)
    routing = dataclasses.replace(
        site.routing,
        trusted_proxies=trusted,
        proxy_protocol=True,
        limits=limits or ConnectionLimits(),
    )
    port = await nursery.start(
        partial(serve_ingress, routing, host="127.0.0.1", port=0, handler_nursery=nursery)
    )
    return Site(routing, site.backends), port


async def proxied_caller(port: int, *header_pieces: bytes) -> Caller:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    for piece in header_pieces:  # separate sends: a header split across reads
        await stream.send_all(piece)
    return Caller(stream)


BALANCER_ITSELF = "127.0.0.1"


@pytest.mark.parametrize(
    ("pieces", "caller_ip"),
    [
        ([b"PROXY TCP4 198.51.100.20 192.0.2.1 51000 80\r\n"], "198.51.100.20"),
        ([b"PROX", b"Y TCP6 2001:db8::7 2001:db8::1 51000 80", b"\r\n"], "2001:db8::7"),
        ([proxy_v2("198.51.100.21")], "198.51.100.21"),
        ([proxy_v2("2001:db8::8")[:9], proxy_v2("2001:db8::8")[9:]], "2001:db8::8"),
        ([b"PROXY UNKNOWN\r\n"], BALANCER_ITSELF),
        ([], BALANCER_ITSELF),  # no header: the balancer's own request (a health check)
    ],
)
async def test_a_trusted_balancers_proxy_header_names_the_caller(
    pieces: list[bytes], caller_ip: str
) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site, port = await start_proxied_ingress(nursery)
            caller = await proxied_caller(port, *pieces)
            response, _ = await caller.request("1001.localhost", headers=SPOOFED[:1])
            assert response.status_code == 200
            response, _ = await caller.request("1001.localhost")  # keep-alive: same caller
            assert response.status_code == 200
            first, second = site.all_seen
            # A caller behind the balancer is not trusted: what it claims is replaced. The
            # balancer itself is, so its X-Forwarded-For is extended.
            claimed = b"198.51.100.7, " if caller_ip == BALANCER_ITSELF else b""
            assert first.header(b"x-forwarded-for") == [claimed + caller_ip.encode()]
            assert second.header(b"x-forwarded-for") == [caller_ip.encode()]
            await caller.stream.aclose()
            nursery.cancel_scope.cancel()


async def test_a_proxy_header_from_an_untrusted_peer_is_a_bad_request() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site, port = await start_proxied_ingress(
                nursery, trusted=(ipaddress.ip_network("10.0.0.0/8"),)
            )
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(
                    b"PROXY TCP4 198.51.100.20 192.0.2.1 51000 80\r\n"
                    b"GET / HTTP/1.1\r\nHost: 1001.localhost\r\n\r\n"
                )
                answer = bytearray()
                while chunk := await stream.receive_some():
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 400 "), bytes(answer)
            assert site.all_seen == []
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 198.51.100.300 192.0.2.1 51000 80\r\n",
        b"PROXY TCP4 2001:db8::7 192.0.2.1 51000 80\r\n",
        b"PROXY TCP4 198.51.100.20 192.0.2.1 99999 80\r\n",
        b"PROXY " + b"X" * 200,  # no end within 107 bytes
        b"\r\n\r\n\x00\r\nQUIT\n\x11\x11\x00\x0c" + bytes(12),  # version 1 in a v2 header
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff",  # 65,535 bytes announced
    ],
)
async def test_a_malformed_proxy_header_closes_the_connection_unanswered(header: bytes) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site, port = await start_proxied_ingress(nursery)
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(header + b"GET / HTTP/1.1\r\nHost: 1001.localhost\r\n\r\n")
                with contextlib.suppress(trio.BrokenResourceError):  # closed, or reset unread
                    assert await stream.receive_some() == b""
            assert site.all_seen == []
            nursery.cancel_scope.cancel()


async def test_connection_limits_count_the_callers_a_balancer_names() -> None:
    """Per address means per caller: the balancer's own address would cap every caller."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            limits = ConnectionLimits(total=10, per_address=1)
            _, port = await start_proxied_ingress(nursery, limits=limits)
            first = await proxied_caller(port, proxy_v2("198.51.100.1"))
            second = await proxied_caller(port, proxy_v2("198.51.100.2"))
            for caller in (first, second):
                response, _ = await caller.request("1001.localhost")
                assert response.status_code == 200
            again = await proxied_caller(port, proxy_v2("198.51.100.1"))
            response, _ = await again.request("1001.localhost")
            assert response.status_code == 503
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("request_head", "status_line"),
    [
        (b"GET / HTTP/1.1\r\nHost: nobody.localhost\r\n\r\n", b"HTTP/1.1 404 Not Found\r\n"),
        (b"GET / HTTP/1.1\r\nHost: 1004.localhost\r\n\r\n", b"HTTP/1.1 502 Bad Gateway\r\n"),
        (b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\n", b"HTTP/1.1 405 Method Not Allowed\r\n"),
        (b"GET / HTTP/1.1\r\nHost: a@b\r\n\r\n", b"HTTP/1.1 400 Bad Request\r\n"),
    ],
)
async def test_statuses_the_ingress_writes_itself_carry_their_reason_phrase(
    request_head: bytes, status_line: bytes
) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site = await start_site(nursery)
            caller = await connect(nursery, site)
            await caller.send_all(request_head)
            answer = b""
            while b"\r\n" not in answer:
                answer += await caller.receive_some()
            assert answer.startswith(status_line), answer
            nursery.cancel_scope.cancel()


# HTTP/1.0 callers (RFC 9112 9.3 and appendix C.2.2).


async def read_response(
    stream: trio.abc.ReceiveStream, received: bytearray
) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One response from ``received`` + the stream: its status line, headers and body (by
    its Content-Length, or to the end of the stream)."""
    while b"\r\n\r\n" not in received:
        chunk = await stream.receive_some()
        assert chunk, f"closed after {bytes(received)!r}"
        received += chunk
    head, _, rest = bytes(received).partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = {name.lower(): value for name, _, value in (line.partition(b": ") for line in lines)}
    received[:] = rest
    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        while len(received) < length:
            received += await stream.receive_some()
    else:
        while chunk := await stream.receive_some():
            received += chunk
        length = len(received)
    body = bytes(received[:length])
    del received[:length]
    return status_line, headers, body


async def closed(stream: trio.abc.ReceiveStream) -> bool:
    return await stream.receive_some() == b""


def http10(path: bytes, *headers: bytes) -> bytes:
    return b"GET %s HTTP/1.0\r\nHost: 1001.localhost\r\n%s\r\n" % (
        path,
        b"".join(header + b"\r\n" for header in headers),
    )


async def test_an_http10_caller_asking_for_keep_alive_keeps_its_connection() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site = await start_site(nursery)
            stream = await connect(nursery, site)
            received = bytearray()
            for path in (b"/first", b"/second"):
                await stream.send_all(http10(path, b"Connection: keep-alive"))
                status, headers, body = await read_response(stream, received)
                assert status.startswith(b"HTTP/1.1 200 ")
                assert headers[b"connection"] == b"keep-alive"
                assert body == b"A " + path + b" "
            assert [seen.path for seen in site.all_seen] == [b"/first", b"/second"]
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "connection", [b"", b"Connection: close", b"Connection: keep-alive, close"]
)
async def test_an_http10_caller_not_asking_for_keep_alive_is_closed_after_its_answer(
    connection: bytes,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site = await start_site(nursery)
            stream = await connect(nursery, site)
            await stream.send_all(http10(b"/only", *filter(None, [connection])))
            status, headers, body = await read_response(stream, received := bytearray())
            assert status.startswith(b"HTTP/1.1 200 ")
            assert (headers[b"connection"], body) == (b"close", b"A /only ")
            assert not received
            assert await closed(stream)
            nursery.cancel_scope.cancel()


async def unframed(stream: TunnelStream, target: str) -> None:
    """A private service answering without a length: its body ends when it closes."""
    stream.accept()
    request = b""
    while b"\r\n\r\n" not in request:
        request += await stream.receive_some()
    await stream.send_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nstreamed until close"
    )
    await stream.aclose()


@pytest.mark.parametrize(
    ("version", "framing", "body"),
    [
        (b"1.1", (b"transfer-encoding", b"chunked"), b"14\r\nstreamed until close\r\n0\r\n\r\n"),
        (b"1.0", (b"connection", b"close"), b"streamed until close"),
    ],
)
async def test_a_body_of_unknown_length_goes_chunked_to_http11_and_until_close_to_http10(
    version: bytes, framing: tuple[bytes, bytes], body: bytes
) -> None:
    """An HTTP/1.0 caller cannot read chunks: it gets the body as it comes, then the close,
    though it asked for keep-alive."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            site = await start_site(nursery)
            hub = Hub()
            session = (await session_pair(nursery, handler=unframed)).server.session
            hub.attach(Attachment(session, ["1001"], remote="test", vitae={}))
            routing = dataclasses.replace(site.routing, open_upstream=hub.open_stream)
            stream = await connect(nursery, Site(routing, site.backends))
            await stream.send_all(
                b"GET / HTTP/%s\r\nHost: 1001.localhost\r\nConnection: keep-alive\r\n\r\n" % version
            )
            received = bytearray()
            while not received.endswith(body):
                chunk = await stream.receive_some()
                assert chunk, bytes(received)
                received += chunk
            head = bytes(received).partition(b"\r\n\r\n")[0].lower()
            assert b"%s: %s\r\n" % framing in head + b"\r\n"
            assert b"content-length" not in head
            if version == b"1.0":
                assert await closed(stream)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("visitors", "shared"),
    [
        (("2001:db8:1:2::1", "2001:db8:1:2:ffff::9"), True),  # one /64: one subscriber
        (("2001:db8:1:2::1", "2001:db8:1:3::1"), False),
        (("192.0.2.1", "::ffff:192.0.2.1"), True),  # the same IPv4 caller, either socket
        (("192.0.2.1", "192.0.2.2"), False),
    ],
)
def test_a_rate_limit_counts_an_ipv6_subscriber_by_its_64(
    visitors: tuple[str, str], shared: bool
) -> None:
    first, second = (_rate_key(visitor) for visitor in visitors)
    assert (first == second) is shared
