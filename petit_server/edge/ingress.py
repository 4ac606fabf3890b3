"""Public HTTP ingress: parse each request, route it by Host, carry it through a tunnel.

# Theory of operation

- Each public connection is one task. Each request on it is routed on its own Host (an
  alias, ``<ID>-anything.<domain>`` or ``<ID>.<domain>``), so a keep-alive connection can
  never be steered to another customer by its first request.
- HTTP/1.1 is read and written with ``http1`` (heads parsed by llhttp, bodies framed there):
  the caller's requests and, on each tunnel stream, the service's responses. This module
  decides what that means for each connection: keep-alive, 100-continue, upgrades, and how
  to frame what the caller gets (Content-Length as the service sent it, else chunked, or to
  an HTTP/1.0 caller until close). An HTTP/1.0 caller that asks for keep-alive keeps its
  connection whenever the response has a length.
- The request goes upstream as a fresh HTTP/1.1 message over a tunnel stream; the client
  splices that stream to its private service. The upstream stream is reused while
  consecutive requests go to the same registration and both sides keep the connection alive.
- Bodies stream both ways with back-pressure: nothing is buffered whole. The request body
  and the response are pumped concurrently, so a backend that answers before reading the
  whole body (413, 401) does not deadlock the proxy.
- Framing is strict (``http1``'s docstring): smuggling shapes (Content-Length with
  Transfer-Encoding, duplicate lengths, bad chunks) are refused with 400 before anything
  reaches a tunnel; a response framed two ways gets the caller a 502.
- Once routed, a request meets its registration's policy (``petit_server/policy.py``) before
  any tunnel stream opens: a visitor outside its allow-list (or in its deny-list) gets 403,
  one past its rate 429 with Retry-After, a declared body past its maximum 413 (a chunked
  one is cut with 413 once it passes). Its timeouts replace the server's for that request
  (open, response) and for the wait for the connection's next request (idle).
- A connection's waits are timed by one ``petit.deadlines.Deadline``, not a cancel scope per
  wait (a fifth of the CPU per request): idleTimeout for the first byte of the next request
  (then it closes quietly), headerTimeout for the rest of its head (408 if any came),
  responseTimeout for the response head (504). A timeout ends the connection.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final

import trio

from petit import sockio
from petit.connection import PROBE, StreamKind, stream_target
from petit.control import in_networks
from petit.deadlines import new_deadline
from petit.errors import first_leaf
from petit.listen import serve_tcp
from petit.logs import Throttled
from petit.proxyprotocol import V1_MAX, ProxyProtocolError, read_header
from petit.session import Drained, SessionClosedError, StreamRefusedError, Traffic, splice
from petit_server.edge import http1
from petit_server.edge.http1 import END, NEED_DATA, Headers, tokens
from petit_server.edge.rates import TokenBuckets
from petit_server.policy import Policy
from petit_server.usage import RequestMeter, UsageStore

log = logging.getLogger("petit.ingress")
_bugs = Throttled(log)  # a bug a peer can trigger at will logs once per interval

READ_CHUNK: Final = 256 * 1024  # bytes
UNAVAILABLE_BODY: Final = b'{"g2c":"unavailable"}'
MAX_DISCARDED_BODY: Final = 1024 * 1024  # bytes read and dropped to keep a connection alive
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
    }
)
# End-to-end fields a Connection header may not make us drop: without them the request
# could not be routed or framed (a caller naming them only tries to desync us).
UPGRADES: Final = frozenset({b"websocket"})  # protocols a request may switch to, lowercase
# The waits a connection's Deadline times (its phases).
_IDLE_TIMEOUT: Final = "idle"  # for the first byte of the next request: closed quietly
_HEAD_TIMEOUT: Final = "head"  # for the rest of a request head: 408 if any came
_RESPONSE_TIMEOUT: Final = "response"  # for the response head: 504
_NEVER_HOP_BY_HOP: Final = frozenset({b"host", b"content-length", b"transfer-encoding"})
# What sending a request body up a tunnel stream raises when the stream or its session ends.
_UPSTREAM_GONE: Final = (trio.BrokenResourceError, trio.ClosedResourceError, SessionClosedError)
# Who the caller is, as a proxy says it: only a trusted proxy's are kept (X-Forwarded-* too).
_FORWARDING_HEADERS: Final = frozenset(
    {b"forwarded", b"x-real-ip", b"true-client-ip", b"x-client-ip", b"client-ip"}
)
_HOST_HEADER = re.compile(r"(?P<name>[a-z0-9.-]+|\[[0-9a-f:.]+\])(?::[0-9]{0,5})?", re.IGNORECASE)


@dataclass(slots=True)
class ConnectionLimits:
    """Open public connections, in total and per source address: past either bound a new
    connection is refused at once (HTTP gets a 503; what it sent is discarded, never parsed),
    so no caller can hold all the descriptors or all the memory. Refusals are logged once
    per interval."""

    total: int = 10_000
    per_address: int = 256
    open: int = 0
    _by_address: dict[str, int] = field(default_factory=dict)
    _reports: Throttled = field(default_factory=lambda: Throttled(log))

    def admit(self, address: str) -> bool:
        """Count a new connection from ``address`` in, or refuse it (False)."""
        from_address = self._by_address.get(address, 0)
        if self.open >= self.total or from_address >= self.per_address:
            self._reports.log(
                logging.WARNING,
                "limits",  # one line per interval for all refusals, as one flood
                trio.current_time(),
                "refused a public connection past the limits (%d open, at most %d; "
                "%d from %s, at most %d per address)",
                self.open,
                self.total,
                from_address,
                address,
                self.per_address,
            )
            return False
        self.open += 1
        self._by_address[address] = from_address + 1
        return True

    def release(self, address: str) -> None:
        """Count a connection ``admit`` let in out again."""
        self.open -= 1
        left = self._by_address[address] - 1
        if left:
            self._by_address[address] = left
        else:
            del self._by_address[address]


@dataclass(frozen=True, slots=True)
class Routing:
    """What the ingress needs from the server: which registration a Host names, who serves it."""

    route: Callable[[str], str | None]  # Host header -> registered ID (alias or ID rule) or None
    # a stream to a registration's private service (hub.Upstreams.open_stream)
    open_upstream: Callable[[str], Awaitable[trio.abc.HalfCloseableStream]]
    open_timeout: float
    header_timeout: float
    response_timeout: float = 60.0
    idle_timeout: float = 75.0
    usage: UsageStore | None = None  # where each routed request's usage is recorded
    # Peers whose forwarding headers we keep and extend (load balancers); everyone else's
    # are replaced by ours.
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # Whether trusted peers (L4 load balancers) may name the caller with a PROXY header.
    proxy_protocol: bool = False
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    # Registration ID -> its own policy (what the registry holds for it).
    policy_of: Callable[[str], Policy] = lambda _: Policy()
    visitors: TokenBuckets = field(default_factory=TokenBuckets)  # requests per visitor

    def timeouts(self, policy: Policy) -> tuple[float, float, float]:
        """(open, response, idle) seconds for a request under ``policy``."""
        return (
            policy.open_timeout or self.open_timeout,
            policy.response_timeout or self.response_timeout,
            policy.idle_timeout or self.idle_timeout,
        )


class _Upstream:
    """One tunnel stream to one registration's private service (or its client's tunnel
    check), and the responses read from it."""

    def __init__(self, target: str, stream: trio.abc.HalfCloseableStream) -> None:
        self.target = target  # the stream's OPEN target: a registration ID, or its check
        self.stream = stream
        self.responses = http1.ResponseReader()
        self.request_sent = False  # the current request went out whole
        self.keep_alive = False  # the current response lets the stream carry another

    async def receive(self) -> None:
        """Hand the response reader the next bytes from the tunnel stream."""
        self.responses.receive_data(bytes(await self.stream.receive_some(READ_CHUNK)))

    @property
    def reusable(self) -> bool:
        """Whether the next request to the same target may use this stream: the exchange
        finished cleanly, and the service neither closed it nor sent bytes past its answer
        (they would pass for the next response)."""
        responses = self.responses
        return (
            self.request_sent
            and responses.done
            and self.keep_alive
            and not responses.at_eof
            and not responses.buffered
        )


class _UpstreamFailedError(Exception):
    """The tunnel or the private service failed before a response began."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Reply(enum.Enum):
    """How far our answer to the current request got."""

    NONE = enum.auto()  # no final response yet (a 1xx may have gone)
    BODY = enum.auto()  # its head went, its body is under way
    DONE = enum.auto()
    SWITCHED = enum.auto()  # a 101 went: the connection carries another protocol now


class IngressConnection:
    """Serves one public connection until either side closes it.

    ``proto`` is the caller's scheme, passed on as X-Forwarded-Proto. With
    ``redirect_to_port`` every request is answered with a redirect to HTTPS on that port.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        routing: Routing,
        peer_ip: str,
        *,
        proto: str = "http",
        redirect_to_port: int | None = None,
        socket: trio.socket.SocketType | None = None,
    ) -> None:
        """``socket``: the one ``stream`` runs over, when there is one (see ``drains_into``)."""
        self._stream = stream
        self._socket = socket
        self._routing = routing
        self._peer_ip = peer_ip
        self._proto = proto
        self._redirect_to_port = redirect_to_port
        self._requests = http1.RequestReader()
        self._request: http1.Request | None = None  # the one being answered
        self._reply = _Reply.NONE
        self._keep_alive = False  # the connection may carry another request after this one
        self._waiting_for_continue = False  # the caller holds its body until a 100 (Expect)
        self._upstream: _Upstream | None = None
        self._meter = RequestMeter(routing.usage)
        # The routed request's timeouts; idle is the wait for the next request.
        self._open_timeout, self._response_timeout, self._idle_timeout = routing.timeouts(Policy())
        self._body_left: int | None = None  # bytes the request body may still hold
        self._peer_trusted = in_networks(peer_ip, routing.trusted_proxies)
        self._deadline = new_deadline()  # idle, head or response timeout

    async def run(self) -> None:
        """Serve requests until the connection should close, or one of its waits times out:
        then answer as that timeout says (408, 504) and close."""
        try:
            with self._deadline:
                await self._serve_requests()
            await self._answer_timeout(self._deadline.expired)
        finally:
            self._meter.end(complete=False)  # a request an exception cut short, if any
            await self._drop_upstream()

    async def _serve_requests(self) -> None:
        while True:
            request = await self._read_request_head()
            if request is None:
                return
            self._meter.begin(request.method, request.target)
            if self._redirect_to_port is None:
                await self._handle(request)
            else:
                await self._redirect_to_https(request, self._redirect_to_port)
            self._end_metering()
            if not (self._reply is _Reply.DONE and self._keep_alive and self._requests.done):
                return  # must close, or a response was cut short
            self._requests.next_message()

    async def _answer_timeout(self, phase: str | None) -> None:
        """What a connection whose ``phase`` timed out gets before it closes."""
        if phase == _HEAD_TIMEOUT and self._requests.buffered:
            await self._refuse_head(408, b"request header timeout")
        elif phase == _RESPONSE_TIMEOUT:
            await self._drop_upstream()
            self._keep_alive = False
            # Discarding the request body takes at most headerTimeout, and so may the answer.
            with trio.move_on_after(2 * self._routing.header_timeout):
                await self._refuse(504)
            self._end_metering()

    def _end_metering(self) -> None:
        """The request's usage is complete; bytes read past it are the next request's."""
        self._meter.end(
            complete=self._reply in (_Reply.DONE, _Reply.SWITCHED),
            read_ahead=self._requests.buffered if self._requests.done else 0,
        )

    async def _receive(self) -> None:
        try:
            data = await sockio.receive(self._stream, READ_CHUNK)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        self._meter.received(len(data))
        self._requests.receive_data(data)

    async def _next_public_event(self) -> http1.Event:
        while (event := self._requests.next_event()) is NEED_DATA:
            await self._receive()
        return event

    async def _read_request_head(self) -> http1.Request | None:
        """The next request head, or None when the caller is gone or misbehaved (answered).

        An idle connection may wait idleTimeout for its first byte; from then on the whole
        head must arrive within headerTimeout, however slowly it trickles in (slowloris).
        """
        self._request, self._reply, self._keep_alive = None, _Reply.NONE, False
        self._waiting_for_continue = False
        deadline = self._deadline
        if not self._requests.buffered:
            deadline.start(self._idle_timeout, _IDLE_TIMEOUT)
            await self._receive()
        try:
            request = self._requests.next_event()  # usually whole in the first read
            if request is NEED_DATA:
                deadline.start(self._routing.header_timeout, _HEAD_TIMEOUT)
                request = await self._next_public_event()
            await deadline.finish()
        except http1.ProtocolError as exc:
            await deadline.finish()
            await self._refuse_head(exc.status, f"bad request: {exc}".encode())
            return None
        if not isinstance(request, http1.Request):
            return None  # closed between requests
        self._request = request
        connection = request.connection
        if request.version == b"1.0":  # RFC 9112 9.3: keep-alive only when asked
            self._keep_alive = (
                b"keep-alive" in connection
                and b"close" not in connection
                and request.body != http1.CHUNKED  # 6.1: a 1.0 chunked body closes after
            )
        else:
            self._keep_alive = b"close" not in connection
            expect = tokens(request.headers, b"expect")
            self._waiting_for_continue = b"100-continue" in expect
        return request

    async def _refuse_head(self, status: int, body: bytes) -> None:
        """Answer a head we will not read to the end; a caller that does not read its answer
        holds us no longer than headerTimeout."""
        with trio.move_on_after(self._routing.header_timeout):
            await self._send_simple(status, body)

    async def _handle(self, request: http1.Request) -> None:
        if request.method == b"CONNECT":
            self._keep_alive = False  # what follows was meant for a tunnel, not as a request
            await self._discard_request_body()
            await self._send_simple(405, b"CONNECT is not served here: petit is no forward proxy")
            return
        if request.connection & _NEVER_HOP_BY_HOP:
            await self._send_simple(400, b"Connection may not name Host or the message framing")
            return
        try:
            host, target = _authority_and_target(request)
        except ValueError as exc:
            await self._send_simple(400, str(exc).encode())
            return
        if not valid_authority(host):
            await self._send_simple(400, b"invalid Host: a host name or [IPv6], and a port")
            return
        registration_id = self._routing.route(host)
        if registration_id is None:
            await self._refuse(404)
            return
        self._meter.routed(registration_id)
        # Never the target: a query string may carry the caller's secrets.
        log.debug("%s for %s routed to %s", request.method.decode(), host, registration_id)
        if not await self._admitted(request, registration_id):
            return
        bad_body: http1.ProtocolError | None = None
        try:
            upstream = await self._upstream_for(
                stream_target(
                    registration_id, StreamKind.PROBE if _is_probe(request) else StreamKind.HTTP
                )
            )
            await self._proxy(request, upstream, host, target)
        except _UpstreamFailedError as failure:
            await self._drop_upstream()
            await self._refuse(failure.status)
        except ExceptionGroup as group:  # the request body pump's failure, from its nursery
            matched, rest = group.split(http1.ProtocolError)
            if rest is not None:
                _, rest = rest.split(_UPSTREAM_GONE)
            if rest is not None:
                raise rest from None
            if matched is None:  # the tunnel stream broke while the body went up it
                await self._drop_upstream()
                await self._refuse(502)
                return
            bad_body = first_leaf(matched)
        if bad_body is not None:  # bad chunking or a truncated body: never pass the rest on
            await self._drop_upstream()
            await self._send_simple(bad_body.status, f"bad request: {bad_body}".encode())

    async def _admitted(self, request: http1.Request, registration_id: str) -> bool:
        """Apply the registration's policy to this request; False once refused (answered)."""
        policy = self._routing.policy_of(registration_id)
        self._open_timeout, self._response_timeout, self._idle_timeout = self._routing.timeouts(
            policy
        )
        self._body_left = policy.max_request_body
        visitor = self._visitor(request)
        if not policy.admits(visitor):
            await self._refuse(403, b"this address may not reach this service")
            return False
        if policy.rate_limit is not None:
            wait = self._routing.visitors.seconds_to_wait(
                (registration_id, _rate_key(visitor)),
                trio.current_time(),
                rate=policy.rate_limit,
                burst=policy.burst,
            )
            if wait:
                retry = str(math.ceil(wait)).encode()
                await self._refuse(429, b"too many requests", [(b"retry-after", retry)])
                return False
        if self._body_left is not None and request.body > self._body_left:  # a declared length
            await self._refuse(413, b"request body over this service's maximum")
            return False
        return True

    async def _upstream_for(self, target: str) -> _Upstream:
        """A stream for ``target`` (a registration, or its tunnel check): the connection's
        last one when it went to the same target, else a new one."""
        if self._upstream is not None and self._upstream.target == target:
            return self._upstream
        await self._drop_upstream()
        try:
            with trio.fail_after(self._open_timeout):
                stream = await self._routing.open_upstream(target)
        except StreamRefusedError:
            raise _UpstreamFailedError(502) from None
        except trio.TooSlowError:
            raise _UpstreamFailedError(504) from None
        except SessionClosedError:
            raise _UpstreamFailedError(503) from None
        if self._socket is not None and isinstance(stream, Drained):
            stream.drains_into(self._socket)
        self._upstream = _Upstream(target, stream)
        return self._upstream

    async def _drop_upstream(self) -> None:
        if self._upstream is not None:
            await self._upstream.stream.aclose()
            self._upstream = None

    async def _proxy(
        self, request: http1.Request, upstream: _Upstream, host: str, target: bytes
    ) -> None:
        headers = self._upstream_headers(request, host)
        upgrade = _upgrade_asked(request)
        if upgrade is not None:  # passed on, so the private service may switch (WebSocket)
            headers += [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
        if self._waiting_for_continue:  # the service may refuse the body
            headers.append((b"expect", b"100-continue"))
        upstream.request_sent = False
        upstream.responses.for_head = request.method == b"HEAD"
        try:
            await upstream.stream.send_all(http1.request_head(request.method, target, headers))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _UpstreamFailedError(502) from None
        if request.body:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump_request_body, upstream, request.body)
                failure = await self._relay_response(upstream, switch_asked=upgrade is not None)
                if failure is not None or not self._requests.done:
                    nursery.cancel_scope.cancel()  # failed, or answered before the body ended
        else:  # most requests: no body, so no task to pump one
            end = self._requests.next_event()
            assert end is END, "a request without a body ends at its head"
            upstream.request_sent = True
            failure = await self._relay_response(upstream, switch_asked=upgrade is not None)
        if failure is not None:  # raised out here, not from the nursery, to stay ungrouped
            raise failure  # once a response began, _refuse sends nothing and run() closes
        if self._reply is _Reply.SWITCHED:
            await self._carry_switched(upstream)
        elif upstream.reusable:
            upstream.responses.next_message()
        else:
            await self._drop_upstream()

    def _upstream_headers(self, request: http1.Request, host: str) -> Headers:
        named_in_connection = request.connection
        keep_forwarding = self._peer_trusted
        headers = [
            (name, value if name != b"host" else host.encode("latin-1"))
            for name, value in request.headers
            if name not in HOP_BY_HOP
            and name not in named_in_connection
            and (keep_forwarding or not _is_forwarding(name))
            and name not in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host")
        ]
        if not any(name == b"host" for name, _ in headers):  # HTTP/1.0, absolute-form
            headers.insert(0, (b"host", host.encode("latin-1")))
        if request.body == http1.CHUNKED:
            headers.append((b"transfer-encoding", b"chunked"))
        prior = (
            [v for n, v in request.headers if n == b"x-forwarded-for"] if keep_forwarding else []
        )
        chain = b", ".join([*prior, self._peer_ip.encode()])
        proto = _first(request.headers, b"x-forwarded-proto") if keep_forwarding else None
        forwarded_host = _first(request.headers, b"x-forwarded-host") if keep_forwarding else None
        headers += [
            (b"x-forwarded-for", chain),
            (b"x-forwarded-proto", proto or self._proto.encode()),
            (b"x-forwarded-host", forwarded_host or host.encode("latin-1")),
        ]
        return headers

    async def _carry_switched(self, upstream: _Upstream) -> None:
        """After a 101 both sides speak the new protocol: relay bytes both ways as they are
        (with flow control, half-closes passed on) until either side ends, then close."""
        self._upstream = None  # this stream is the WebSocket's now, never reused
        traffic = Traffic()
        try:
            early_from_caller = self._requests.pending
            early_from_service = upstream.responses.pending
            if early_from_service:
                await self._stream.send_all(early_from_service)
            if early_from_caller:
                await upstream.stream.send_all(early_from_caller)
            await splice(self._stream, upstream.stream, traffic)
        finally:
            self._meter.carried(traffic.a_to_b, traffic.b_to_a)
            await upstream.stream.aclose()

    async def _pump_request_body(self, upstream: _Upstream, framing: int) -> None:
        while (event := await self._next_public_event()) is not END:
            assert isinstance(event, bytes), "a body is bytes, then END"
            self._waiting_for_continue = False  # the caller sends it without a 100
            if self._body_left is not None:
                self._body_left -= len(event)
                if self._body_left < 0:
                    raise http1.ProtocolError(
                        "request body over this registration's maxRequestBody", 413
                    )
            await upstream.stream.send_all(
                b"".join(http1.chunk(event)) if framing == http1.CHUNKED else event
            )
        if framing == http1.CHUNKED:
            await upstream.stream.send_all(http1.LAST_CHUNK)
        upstream.request_sent = True

    async def _relay_response(
        self, upstream: _Upstream, *, switch_asked: bool
    ) -> _UpstreamFailedError | None:
        """Relay the response; the failure to answer with if it broke before it began.
        Its head must come within responseTimeout (a body may stream for as long as it likes).
        """
        self._deadline.start(self._response_timeout, _RESPONSE_TIMEOUT)
        try:
            await self._pump_response(upstream, switch_asked=switch_asked)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return _UpstreamFailedError(502)
        except http1.ProtocolError as exc:
            log.info("%s sent a response we cannot relay (%s): 502", upstream.target, exc)
            return _UpstreamFailedError(502)
        except _UpstreamFailedError as late:
            return late
        finally:
            self._deadline.clear()  # however the relay ended (an expiry is recorded already)
        return None

    async def _pump_response(self, upstream: _Upstream, *, switch_asked: bool) -> None:
        """Relay the upstream response.

        What the upstream bytes at hand hold goes to the caller in one send: a small
        response (head and body in one tunnel read) costs one syscall, not two.
        """
        outgoing: list[bytes] = []  # pieces to send, passed through without a copy
        chunked = False  # the caller gets the body chunked (its length is not known)
        while True:
            event = upstream.responses.next_event()
            if event is NEED_DATA:
                await self._flush_public(outgoing)
                await upstream.receive()
                continue
            if isinstance(event, http1.Response):
                if event.status == 101 or event.status >= 200:
                    await self._deadline.finish()
                else:  # a 1xx: the final head is still due, and so may be a 504
                    await self._deadline.deliver()
                if event.status == 101:
                    if not switch_asked:
                        raise http1.ProtocolError("a 101 to a request that asked no upgrade")
                    self._queue_public(outgoing, _informational(event), status=101)
                    self._reply = _Reply.SWITCHED
                    await self._flush_public(outgoing)
                    return
                if event.status < 200:
                    self._queue_informational(outgoing, event)
                    continue
                names = {name for name, _ in event.headers}
                upstream.keep_alive = (
                    event.version == b"1.1"
                    and b"close" not in event.connection
                    and event.body != http1.UNTIL_CLOSE
                )
                head, chunked = self._final_head(
                    event.status,
                    event.reason,
                    _response_headers(event),
                    length_known=b"content-length" in names or event.status in (204, 304),
                )
                self._queue_public(outgoing, head, status=event.status)
            elif isinstance(event, bytes):
                pieces = http1.chunk(event) if chunked else [event]
                self._meter.sent(sum(map(len, pieces)))
                outgoing += pieces
                if sum(map(len, outgoing)) >= READ_CHUNK:
                    await self._flush_public(outgoing)
            elif event is END:
                if chunked:
                    self._queue_public(outgoing, http1.LAST_CHUNK)
                self._reply = _Reply.DONE
                await self._flush_public(outgoing)
                return
            else:
                raise trio.BrokenResourceError("the private service closed before answering")

    def _queue_informational(self, outgoing: list[bytes], response: http1.Response) -> None:
        """Pass on a 1xx (not a 101): a 100 only while the caller waits for one (it answers
        its Expect), none to an HTTP/1.0 caller (RFC 9110 15.2)."""
        assert self._request is not None
        if self._request.version == b"1.0":
            return
        if response.status != 100 or self._waiting_for_continue:
            self._queue_public(outgoing, _informational(response))
            self._waiting_for_continue = False

    def _final_head(
        self, status: int, reason: bytes, headers: Headers, *, length_known: bool
    ) -> tuple[bytes, bool]:
        """Our final response's head, and whether its body must go chunked: a body of unknown
        length goes chunked to an HTTP/1.1 caller, and until we close to an HTTP/1.0 one.
        Decides whether the connection stays open after it (``_keep_alive``)."""
        request = self._request
        chunked = False
        if not length_known and request is not None:
            if request.version != b"1.0":
                headers.append((b"transfer-encoding", b"chunked"))
                chunked = request.method != b"HEAD"
            elif request.method != b"HEAD":
                self._keep_alive = False
        if not self._keep_alive:
            headers.append((b"connection", b"close"))
        elif request is not None and request.version == b"1.0":
            headers.append((b"connection", b"keep-alive"))
        self._reply = _Reply.BODY
        return http1.response_head(status, reason, headers), chunked

    def _queue_public(self, outgoing: list[bytes], data: bytes, status: int | None = None) -> None:
        """Append ``data`` for the caller to ``outgoing``; ``status``: it begins a response."""
        self._meter.sent(len(data), status)
        outgoing.append(data)

    async def _flush_public(self, outgoing: list[bytes]) -> None:
        if outgoing:
            await sockio.send(
                self._stream, outgoing[0] if len(outgoing) == 1 else b"".join(outgoing)
            )
            outgoing.clear()

    async def _redirect_to_https(self, request: http1.Request, port: int) -> None:
        location = https_location(_host_header(request), port, request.target)
        await self._discard_request_body()
        if location is None:
            await self._send_simple(400, b"a valid Host header is required")
        else:
            await self._send_simple(308, b"", extra_headers=[(b"location", location)])

    def _visitor(self, request: http1.Request) -> str:
        """The caller's address as far as we can trust it: behind our trusted proxies, the
        nearest X-Forwarded-For address that is not one of them; else the peer's."""
        if not self._peer_trusted:
            return self._peer_ip
        chain = [
            hop.strip()
            for name, value in request.headers
            if name == b"x-forwarded-for"
            for hop in value.decode("latin-1").split(",")
        ]
        for hop in reversed(chain):
            if not in_networks(hop, self._routing.trusted_proxies):
                return hop
        return chain[0] if chain else self._peer_ip

    async def _refuse(
        self,
        status: int,
        reason: bytes | None = None,
        extra_headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        """Answer for the registration without its service: the original's JSON body, or
        ``reason`` as text. The request body is dropped (within MAX_DISCARDED_BODY) so the
        connection may carry the caller's next request."""
        self._meter.refused()
        await self._discard_request_body()
        if reason is None:
            await self._send_simple(status, UNAVAILABLE_BODY, content_type=b"application/json")
        else:
            await self._send_simple(status, reason, extra_headers=extra_headers)

    async def _discard_request_body(self) -> None:
        """Read and drop the refused request's body, within MAX_DISCARDED_BODY bytes and
        headerTimeout seconds; a caller still waiting for a 100 sent none and is answered at
        once. Whatever is left unread closes the connection after the answer."""
        if self._waiting_for_continue:
            self._keep_alive = False
            return
        discarded = 0
        with trio.move_on_after(self._routing.header_timeout):
            while self._requests.in_body and discarded <= MAX_DISCARDED_BODY:
                try:
                    event = await self._next_public_event()
                except http1.ProtocolError:
                    return  # a broken or cut body: answer all the same, then close
                if isinstance(event, bytes):
                    discarded += len(event)

    async def _send_simple(
        self,
        status: int,
        body: bytes,
        *,
        content_type: bytes = b"text/plain",
        extra_headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        """Answer the request ourselves, unless a response to it began already."""
        if self._reply is not _Reply.NONE:
            return
        if not self._requests.done:
            self._keep_alive = False  # the rest of the request is never read
        headers = [
            *extra_headers,
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
        ]
        head, _ = self._final_head(status, _reason(status), headers, length_known=True)
        if self._request is None or self._request.method != b"HEAD":
            head += body
        try:
            await self._stream.send_all(head)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        self._meter.sent(len(head), status)
        self._reply = _Reply.DONE


def valid_authority(host: str) -> bool:
    """Whether a Host (or an absolute target's authority) is a host name of at most 253
    characters or a bracketed IPv6 literal, with at most a port in 0-65535. Anything else
    (user info, a path, bytes beyond ASCII) would be echoed upstream as X-Forwarded-Host."""
    match = _HOST_HEADER.fullmatch(host)
    if match is None or len(match["name"]) > 253:
        return False
    port = host[match.end("name") + 1 :]
    return not port or int(port) <= 65535


def https_location(host: str, port: int, target: bytes) -> bytes | None:
    """The redirect target of a plain request: same host (its port dropped) and target on
    HTTPS ``port``; None if the Host header is no hostname or IP literal."""
    match = _HOST_HEADER.fullmatch(host.strip())
    if match is None:
        return None
    authority = match["name"] if port == 443 else f"{match['name']}:{port}"
    return b"https://" + authority.encode() + (target if target.startswith(b"/") else b"/")


def _reason(status: int) -> bytes:
    """The standard reason phrase (``504 Gateway Timeout``): some clients and log readers
    show only the phrase."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _informational(response: http1.Response) -> bytes:
    """A 1xx head as the service sent it."""
    return http1.response_head(response.status, response.reason, response.headers)


def _is_probe(request: http1.Request) -> bool:
    """The original petit's tunnel check: ``GET /-g2c-intercept...``, answered by the client
    itself (any path starting so, as the original matched it)."""
    return request.method == b"GET" and request.target.startswith(PROBE.encode())


def _upgrade_asked(request: http1.Request) -> bytes | None:
    """The protocol an HTTP/1.1 request without a body asks to switch to, if it is one we
    pass on (WebSocket); else None, and Upgrade is stripped as hop-by-hop. Not h2c: after
    a switch to cleartext HTTP/2 the caller's requests would no longer pass the ingress one
    by one ("h2c smuggling")."""
    if request.version != b"1.1" or request.body:
        return None
    if b"upgrade" not in request.connection:
        return None
    protocol = _first(request.headers, b"upgrade")
    return protocol if protocol is not None and protocol.lower() in UPGRADES else None


def _host_header(request: http1.Request) -> str:
    return (_first(request.headers, b"host") or b"").decode("latin-1")


def _authority_and_target(request: http1.Request) -> tuple[str, bytes]:
    """The authority that routes the request and the origin-form target to pass on.

    RFC 9112 3.2.2: with an absolute-form target (``GET http://a.example/x``) the target's
    authority wins over the Host header. The backend always gets origin-form and, as Host,
    the authority that routed the request, so no target can pick another virtual host
    behind the same registration. ValueError (400) for an authority with user info, and
    for any other target but origin-form and ``*`` (OPTIONS): a ``ws://other/`` target
    passed on as it is would let some servers take its host for the request's.
    """
    target = request.target
    scheme, separator, rest = target.partition(b"://")
    if not separator or scheme.lower() not in (b"http", b"https"):
        if not target.startswith(b"/") and not (target == b"*" and request.method == b"OPTIONS"):
            raise ValueError("a request target is a path (or http(s)://host/path)")
        return _host_header(request), target
    end = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
    authority, path = rest[:end], rest[end:]
    if b"@" in authority or not authority:
        raise ValueError("an absolute-form target needs a host and no user info")
    if not path.startswith(b"/"):
        path = b"/" + path
    return authority.decode("latin-1"), path


def _is_forwarding(name: bytes) -> bool:
    """Whether a header says who the caller is or how it came (underscore spellings too,
    which some servers read as the dashed ones)."""
    name = name.replace(b"_", b"-")
    return name.startswith(b"x-forwarded-") or name in _FORWARDING_HEADERS


def _first(headers: Headers, wanted: bytes) -> bytes | None:
    return next((value for name, value in headers if name == wanted), None)


def _rate_key(visitor: str) -> str:
    """Whose rate a visitor's request counts in: its address, or for IPv6 its /64, which
    one subscriber usually holds whole (else each of its 2**64 addresses had its own bucket)."""
    try:
        address = ipaddress.ip_address(visitor)
    except ValueError:
        return visitor
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _response_headers(response: http1.Response) -> Headers:
    """The service's fields the caller gets: no hop-by-hop ones, nor those its Connection
    names, except the framing (a Connection naming Content-Length must not leave the caller
    with a body and no length)."""
    named_in_connection = response.connection - _NEVER_HOP_BY_HOP
    return [
        (name, value)
        for name, value in response.headers
        if name not in HOP_BY_HOP and name not in named_in_connection
    ]


async def handle_public_connection(
    connection: trio.SocketStream,
    *,
    routing: Routing,
    tls: Callable[[trio.abc.Stream], Awaitable[trio.abc.Stream]] | None = None,
    redirect_to_port: int | None = None,
) -> None:
    """Serve one public connection, over the stream ``tls`` handshakes when given (HTTPS).

    A failure here never reaches other connections. Past the connection limits it is
    refused before anything is parsed. With ``proxy_protocol``, a trusted peer's PROXY
    header (read within headerTimeout) names the caller, who is then the peer for the
    limits, X-Forwarded-For and the trust in forwarding headers.
    """
    stream: trio.abc.Stream = connection
    admitted: str | None = None
    try:
        peer = connection.socket.getpeername()
        peer_ip = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        if routing.proxy_protocol and in_networks(peer_ip, routing.trusted_proxies):
            with trio.fail_after(routing.header_timeout):
                caller, stream = await _read_proxy_header(connection)
            peer_ip = caller or peer_ip
        if not routing.limits.admit(peer_ip):
            if tls is None:
                with trio.move_on_after(1):  # bounded: the refusal, then a brief linger
                    await connection.send_all(_OVER_LIMITS)
                    await connection.send_eof()
                    # Closing with the request unread would reset the connection, and the
                    # reset can destroy the 503 before the caller reads it: drop what comes.
                    discarded = 0
                    while discarded < http1.MAX_HEAD and (chunk := await connection.receive_some()):
                        discarded += len(chunk)
            return
        admitted = peer_ip
        if tls is not None:
            stream = await tls(stream)
        proto = "http" if tls is None else "https"
        await IngressConnection(
            stream,
            routing,
            peer_ip,
            proto=proto,
            redirect_to_port=redirect_to_port,
            socket=connection.socket,
        ).run()
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError) as exc:
        log.debug("public connection dropped: %r", exc)
    except ProxyProtocolError as exc:
        log.info("public connection from a trusted proxy dropped: %s", exc)
    except Exception:  # noqa: BLE001 - per-connection boundary: log the bug, keep serving others
        _bugs.bug(trio.current_time(), "bug while serving a public connection")
    finally:
        if admitted is not None:
            routing.limits.release(admitted)
        await trio.aclose_forcefully(stream)


async def _read_proxy_header(connection: trio.SocketStream) -> tuple[str | None, trio.abc.Stream]:
    """The caller a PROXY header names (None: none, or the balancer itself), and the stream
    to go on with: the bytes read past the header come first."""
    received = b""
    while (header := read_header(received)) is None:
        chunk = await connection.receive_some(V1_MAX)
        if not chunk:
            raise trio.BrokenResourceError("closed before its PROXY header ended")
        received += chunk
    return header.source, _Replayed(connection, received[header.size :])


class _Replayed(trio.abc.Stream):
    """A stream whose first bytes were already read (past a PROXY header): they come first."""

    def __init__(self, stream: trio.abc.Stream, first: bytes) -> None:
        self._stream = stream
        self._first = first

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self._first:
            return await self._stream.receive_some(max_bytes)
        await trio.lowlevel.checkpoint()
        size = len(self._first) if max_bytes is None else max_bytes
        data, self._first = self._first[:size], self._first[size:]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


_OVER_LIMITS: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s"
    % (len(UNAVAILABLE_BODY), UNAVAILABLE_BODY)
)


async def serve_ingress(
    routing: Routing,
    *,
    host: str,
    port: int,
    handler_nursery: trio.Nursery,
    redirect_to_port: int | None = None,
    shared: bool = False,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen for public HTTP; report the bound port; handlers run in ``handler_nursery``
    (``shared``: the port is the workers', ``petit.listen``).

    With ``redirect_to_port`` every request is redirected (308) to HTTPS on that port.
    """

    async def handler(stream: trio.SocketStream) -> None:
        await handle_public_connection(stream, routing=routing, redirect_to_port=redirect_to_port)

    await serve_tcp(
        handler,
        port,
        host=host,
        what="HTTP ingress",
        handler_nursery=handler_nursery,
        shared=shared,
        task_status=task_status,
    )
