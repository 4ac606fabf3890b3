"""Hostile HTTP callers against a real server's ingress, byte for byte over raw sockets.

Two registrations, each served by its own recording backend, so every test can say exactly
which requests reached which private service: a smuggling shape must be answered by the
ingress and never show up at a backend, and a keep-alive connection must reach each customer
only with the requests that name it. The README's "Hostile input" table records each outcome.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import h11
import pytest
import trio

from tests.integration.harness import (
    ClientFactory,
    PetitClient,
    PetitServer,
    ServerFactory,
    http_connection,
    http_request,
)

pytestmark = pytest.mark.integration

HEADER_TIMEOUT = 1.0  # seconds, the server's headerTimeout in these tests
EXCHANGE_TIMEOUT = 10.0  # seconds for one raw exchange


class RecordingBackend:
    """A keep-alive HTTP/1.1 backend in the test's own loop: records every request head it
    receives and answers ``<name> <target>``, so a response names the backend that made it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[h11.Request] = []
        self.port = 0

    @property
    def targets(self) -> list[bytes]:
        return [request.target for request in self.seen]

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._serve_connection, listeners)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        http = h11.Connection(h11.SERVER)
        async with stream:
            try:
                while True:
                    event = http.next_event()
                    if event is h11.NEED_DATA:
                        http.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Request):
                        self.seen.append(event)
                    elif isinstance(event, h11.EndOfMessage):
                        await self._answer(http, stream, self.seen[-1].target)
                        if http.our_state is not h11.DONE or http.their_state is not h11.DONE:
                            return
                        http.start_next_cycle()
                    elif not isinstance(event, h11.Data):
                        return
            except (h11.ProtocolError, trio.BrokenResourceError):
                return

    async def _answer(self, http: h11.Connection, stream: trio.SocketStream, target: bytes) -> None:
        body = self.name.encode() + b" " + target
        head = h11.Response(status_code=200, headers=[("Content-Length", str(len(body)))])
        for event in (head, h11.Data(data=body), h11.EndOfMessage()):
            await stream.send_all(http.send(event) or b"")


@dataclass
class Site:
    """A running server with two connected clients, A and B, each on its own backend."""

    server: PetitServer
    clients: list[PetitClient]
    backends: list[RecordingBackend]

    @property
    def port(self) -> int:
        return self.server.http_port

    def host(self, index: int = 0) -> str:
        return self.clients[index].host

    async def assert_serving(self) -> None:
        """The ingress still answers a well-formed request with the right backend."""
        for index, backend in enumerate(self.backends):
            response = await http_request(self.port, self.host(index), target="/alive")
            assert (response.status, response.body) == (200, f"{backend.name} /alive".encode())


@pytest.fixture
async def site(
    server_factory: ServerFactory, client_factory: ClientFactory, nursery: trio.Nursery
) -> Site:
    server = await server_factory(headerTimeout=HEADER_TIMEOUT)
    backends = [RecordingBackend("A"), RecordingBackend("B")]
    for backend in backends:
        await nursery.start(backend.serve)
    clients = [await client_factory(server, backend.port) for backend in backends]
    return Site(server, clients, backends)


@dataclass
class Answer:
    """What a raw caller got: the response status (None: closed without one) and whether the
    server then closed the connection."""

    status: int | None
    closed: bool
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


async def raw_exchange(port: int, pieces: Sequence[bytes], *, pause: float = 0.0) -> Answer:
    """Send ``pieces`` (``pause`` seconds apart: a trickling attacker), then read one response
    and whether the server closes afterwards. Stops sending once the server answered."""
    reader = h11.Connection(h11.CLIENT)
    reader.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    reader.send(h11.EndOfMessage())  # so h11 expects a response; the real bytes are ``pieces``
    answer = Answer(status=None, closed=False)
    with trio.fail_after(EXCHANGE_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream, trio.open_nursery() as nursery:

            async def send_pieces() -> None:
                for index, piece in enumerate(pieces):
                    if index and pause:
                        await trio.sleep(pause)  # the attack itself, not synchronisation
                    try:
                        await stream.send_all(piece)
                    except trio.BrokenResourceError:
                        return

            nursery.start_soon(send_pieces)
            await _read_answer(stream, reader, answer)
            nursery.cancel_scope.cancel()
    return answer


async def _read_answer(stream: trio.SocketStream, reader: h11.Connection, answer: Answer) -> None:
    while True:
        event = reader.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                answer.closed = True
                return
            reader.receive_data(data)
        elif isinstance(event, h11.Response):
            answer.status = event.status_code
            answer.headers = list(event.headers)
        elif isinstance(event, h11.Data):
            answer.body += event.data
        elif isinstance(event, h11.EndOfMessage):
            if reader.their_state is h11.MUST_CLOSE or (b"connection", b"close") in answer.headers:
                continue  # read on to see the close
            return
        else:
            answer.closed = True
            return


def request(host: str, *lines: str, body: bytes = b"", method: str = "GET") -> bytes:
    head = f"{method} / HTTP/1.1\r\nHost: {host}\r\n" + "".join(f"{line}\r\n" for line in lines)
    return head.encode("latin-1") + b"\r\n" + body


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n"


async def test_smuggling_shapes_are_refused_before_any_backend(site: Site) -> None:
    host = site.host()
    smuggled = SMUGGLED.replace(b"{host}", host.encode())
    shapes = {
        "Content-Length with Transfer-Encoding": request(
            host,
            "Content-Length: 4",
            "Transfer-Encoding: chunked",
            body=b"0\r\n\r\n" + smuggled,
            method="POST",
        ),
        "two different Content-Lengths": request(
            host, "Content-Length: 4", "Content-Length: 40", body=b"abcd" + smuggled, method="POST"
        ),
    }
    for name, raw in shapes.items():
        answer = await raw_exchange(site.port, [raw])
        assert (answer.status, answer.closed) == (400, True), name
    assert site.backends[0].seen == [], "a refused request reached the backend"
    await site.assert_serving()


async def test_bad_chunk_size_is_refused_and_nothing_is_smuggled(site: Site) -> None:
    host = site.host()
    raw = request(host, "Transfer-Encoding: chunked", method="POST")
    raw += b"zz\r\n" + SMUGGLED.replace(b"{host}", host.encode())
    answer = await raw_exchange(site.port, [raw])
    assert (answer.status, answer.closed) == (400, True)
    assert b"/smuggled" not in site.backends[0].targets
    await site.assert_serving()


async def test_obs_fold_is_unfolded_and_routed(site: Site) -> None:
    answer = await raw_exchange(site.port, [request(site.host(), "X-Folded: first", " second")])
    assert (answer.status, answer.body) == (200, b"A /")
    folded = [value for name, value in site.backends[0].seen[-1].headers if name == b"x-folded"]
    assert folded == [b"first second"], "the backend must see one unfolded header line"


@pytest.mark.parametrize("complete", [True, False], ids=["whole head", "unterminated head"])
async def test_oversized_request_head_is_refused_with_431(site: Site, complete: bool) -> None:
    raw = request(site.host(), "X-Big: " + "a" * 40_000)
    answer = await raw_exchange(site.port, [raw if complete else raw[:-4]])
    assert (answer.status, answer.closed) == (431, True)
    assert site.backends[0].seen == []
    await site.assert_serving()


async def test_slowloris_is_cut_at_the_header_timeout_while_others_are_served(
    site: Site,
) -> None:
    trickle = [bytes([byte]) for byte in request(site.host(), "X-Slow: " + "s" * 100)]
    outcome: list[tuple[Answer, float]] = []

    async def slowloris() -> None:
        started = trio.current_time()
        answer = await raw_exchange(site.port, trickle, pause=0.05)
        outcome.append((answer, trio.current_time() - started))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slowloris)
        for _ in range(3):
            await site.assert_serving()
    answer, elapsed = outcome[0]
    assert (answer.status, answer.closed) == (408, True), answer
    assert HEADER_TIMEOUT * 0.9 <= elapsed < HEADER_TIMEOUT + 3, elapsed
    assert site.backends[0].targets.count(b"/") == 0


ABSURD_HOSTS = {  # name: (Host, status): 400 for no valid host, 404 for nobody's
    "empty": (b"", 400),
    "10 KB": (b"a" * 10_000, 400),
    "IPv6 literal": (b"[::1]", 404),
    "non-ASCII bytes": (b"\xff\xfe\xc3\xa9.localhost", 400),
    "path traversal": (b"../", 400),
    "path traversal after an ID": (b"../1001.localhost", 400),
    "user info": (b"1001.localhost@evil", 400),
    "a path": (b"1001.localhost/evil", 400),
    "a port past 65535": (b"1001.localhost:99999", 400),
    "nobody's name": (b"9999999.localhost", 404),
}


async def test_absurd_host_values_get_4xx_and_the_server_keeps_serving(site: Site) -> None:
    for name, (host, status) in ABSURD_HOSTS.items():
        raw = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
        answer = await raw_exchange(site.port, [raw])
        assert answer.status == status, name
    for backend in site.backends:
        assert backend.seen == []
    await site.assert_serving()


async def test_keep_alive_request_for_another_customer_goes_to_that_customer(site: Site) -> None:
    with trio.fail_after(EXCHANGE_TIMEOUT):
        async with http_connection(site.port) as connection:
            first = await connection.request(site.host(0), target="/first")
            second = await connection.request(site.host(1), target="/second")
            third = await connection.request(site.host(0), target="/third")
    assert [first.body, second.body, third.body] == [b"A /first", b"B /second", b"A /third"]
    assert site.backends[0].targets == [b"/first", b"/third"]
    assert site.backends[1].targets == [b"/second"]


async def curl_status(port: int, host: str, *options: str) -> tuple[int, bytes]:
    """curl's status and body for GET /via-curl on the ingress (0: no HTTP answer)."""
    argv = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "-H", f"Host: {host}", *options]
    result = await trio.run_process(
        [*argv, f"http://127.0.0.1:{port}/via-curl"], capture_stdout=True, check=False
    )
    body, _, status = result.stdout.rpartition(b"\n")
    return int(status or 0), body


async def test_a_load_balancer_speaking_the_proxy_protocol_is_understood_only_when_trusted(
    site: Site,
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    nursery: trio.Nursery,
) -> None:
    """curl --haproxy-protocol stands for an L4 balancer: with proxyProtocol and the balancer
    in trustedProxies, its header is read and the request served; elsewhere (the default) a
    PROXY line is just bad HTTP, and no backend sees anything."""
    proxied = await server_factory(
        headerTimeout=HEADER_TIMEOUT, trustedProxies=["127.0.0.1"], proxyProtocol=True
    )
    backend = RecordingBackend("behind-balancer")
    await nursery.start(backend.serve)
    client = await client_factory(proxied, backend.port)
    with trio.fail_after(EXCHANGE_TIMEOUT):
        status, body = await curl_status(proxied.http_port, client.host, "--haproxy-protocol")
        assert (status, body) == (200, b"behind-balancer /via-curl")
        assert (b"x-forwarded-for", b"127.0.0.1") in backend.seen[0].headers
        plain = await curl_status(proxied.http_port, client.host)  # the balancer's own request
        assert plain == (200, b"behind-balancer /via-curl")

        status, _ = await curl_status(site.port, site.host(), "--haproxy-protocol")
    assert status == 400
    assert all(not unreached.targets for unreached in site.backends)


async def test_only_websocket_upgrades_reach_the_private_service(site: Site) -> None:
    """An h2c switch would let later requests bypass the ingress one by one ("h2c
    smuggling"): its Upgrade is stripped as hop-by-hop. A WebSocket upgrade is passed on
    (this backend then answers it like any request, and the connection goes on)."""
    host = site.host()
    h2c = request(host, "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: ")
    websocket = request(
        host,
        "Connection: Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    )
    for raw in (h2c, websocket):
        answer = await raw_exchange(site.port, [raw])
        assert answer.status == 200, answer
    stripped, passed = (dict(seen.headers) for seen in site.backends[0].seen)
    assert b"upgrade" not in stripped
    assert b"http2-settings" not in stripped
    assert stripped.get(b"connection", b"") != b"Upgrade"
    assert passed[b"upgrade"] == b"websocket"
    assert passed[b"connection"] == b"upgrade"
