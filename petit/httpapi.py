"""A small HTTP/1.1 server for petit's own APIs: the server's admin API and the client's
status endpoint.

HTTP is h11's. One task per connection, keep-alive, request heads and bodies bounded in size
and time, every reply with a length. What a request means is the caller's ``answer``
function: an async function that gets the parsed request and returns a ``Reply``, or raises
``HttpError`` (async, because an answer may change a registry that lives on the network).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final, TypeAlias

import h11
import trio

from petit.listen import serve_tcp

MAX_HEAD: Final = 16 * 1024  # bytes of a request head
MAX_BODY: Final = 16 * 1024  # bytes of a request body (these APIs take small documents)
READ_CHUNK: Final = 64 * 1024
HEAD_TIMEOUT: Final = 10.0  # seconds for a request head and body, once begun
IDLE_TIMEOUT: Final = 75.0  # seconds an idle keep-alive connection stays open
JSON: Final = b"application/json"
LOOPBACK_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "[::1]"})

log = logging.getLogger("petit.http")


class HttpError(Exception):
    """A request answered with an error status and ``{"success": false, "error": ...}``."""

    def __init__(
        self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or []


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed request, as an ``answer`` function sees it."""

    method: str
    target: str
    headers: Mapping[bytes, bytes]  # lower-case names; a repeated header's values joined
    body: bytes
    peer: str  # the caller's IP address


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: bytes = JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()


Answer: TypeAlias = Callable[[Request], Awaitable[Reply]]


def response_head(status: int, headers: list[tuple[bytes, bytes]]) -> h11.Response:
    """A response head with the standard reason phrase (``504 Gateway Timeout``): h11 writes
    none unless told, and some clients and log readers show only the phrase."""
    try:
        reason = HTTPStatus(status).phrase.encode()
    except ValueError:
        reason = b""
    return h11.Response(status_code=status, headers=headers, reason=reason)


def json_reply(document: Mapping[str, object], status: int = 200) -> Reply:
    return Reply(status, json.dumps(document).encode())


def error_reply(error: HttpError) -> Reply:
    body = json.dumps({"success": False, "error": str(error)}).encode()
    return Reply(error.status, body, headers=tuple(error.headers))


def allow(method: str, allowed: str) -> None:
    """405 unless the request used the one method this path takes."""
    if method != allowed:
        raise HttpError(405, f"method {method} not allowed here", [(b"allow", allowed.encode())])


def loopback_json(routes: Mapping[str, Callable[[], Mapping[str, object]]]) -> Answer:
    """An ``answer`` for a read-only status endpoint: ``GET <path>`` → that route's document,
    only for a Host of localhost, 127.0.0.1 or [::1], so a web page whose DNS name was
    rebound to 127.0.0.1 cannot read it."""

    async def answer(request: Request) -> Reply:
        host = request.headers.get(b"host", b"").decode("latin-1").lower()
        if host.rpartition(":")[0] not in LOOPBACK_HOSTS and host not in LOOPBACK_HOSTS:
            raise HttpError(403, "only served to Host localhost, 127.0.0.1 or [::1]")
        allow(request.method, "GET")
        document = routes.get(request.target.partition("?")[0])
        if document is None:
            raise HttpError(404, f"not found; paths: {', '.join(sorted(routes))}")
        return json_reply(document())

    return answer


async def serve_api(
    answer: Answer,
    *,
    host: str,
    port: int,
    handler_nursery: trio.Nursery | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen and serve ``answer`` forever; ``task_status.started`` gets the bound port."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            async with stream:
                peer = str(stream.socket.getpeername()[0])  # fails if the peer has already reset
                await _Connection(stream, answer, peer).run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("API connection dropped: %r", exc)
        except Exception:  # per-connection boundary: log the bug, keep serving others
            log.exception("bug while serving an API connection")

    await serve_tcp(
        handler,
        port,
        host=host,
        what="HTTP API",
        handler_nursery=handler_nursery,
        task_status=task_status,
    )


class _Connection:
    """One connection: h11 requests in, replies out, until either side closes."""

    def __init__(self, stream: trio.SocketStream, answer: Answer, peer: str) -> None:
        self._stream = stream
        self._answer = answer
        self._peer = peer
        self._http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)

    async def run(self) -> None:
        """Serve requests until the peer closes, idles out or must be closed."""
        while True:
            if not self._http.trailing_data[0]:
                with trio.move_on_after(IDLE_TIMEOUT) as idle:
                    await self._receive()
                if idle.cancelled_caught:
                    return
            with trio.move_on_after(HEAD_TIMEOUT) as slow:  # head and body, once begun
                request = await self._next_event()
                body = await self._read_body() if isinstance(request, h11.Request) else b""
            if slow.cancelled_caught:
                await self._send(error_reply(HttpError(408, "request timeout")), close=True)
                return
            if not isinstance(request, h11.Request) or body is None:
                return
            await self._send(await self._reply(request, body), close=False)
            if self._http.our_state is not h11.DONE or self._http.their_state is not h11.DONE:
                return
            self._http.start_next_cycle()

    async def _reply(self, request: h11.Request, body: bytes) -> Reply:
        headers: dict[bytes, bytes] = {}
        for name, value in request.headers:
            headers[name] = headers[name] + b", " + value if name in headers else value
        parsed = Request(
            method=request.method.decode("ascii", "replace"),
            target=request.target.decode("ascii", "replace"),
            headers=headers,
            body=body,
            peer=self._peer,
        )
        try:
            return await self._answer(parsed)
        except HttpError as exc:
            return error_reply(exc)

    async def _receive(self) -> None:
        try:
            data = await self._stream.receive_some(READ_CHUNK)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        self._http.receive_data(data)

    async def _next_event(self) -> h11.Event | None:
        """The next event; None if the peer sent something h11 refuses (then answered)."""
        while True:
            try:
                event = self._http.next_event()
            except h11.RemoteProtocolError as exc:
                error = HttpError(exc.error_status_hint, f"bad request: {exc}")
                await self._send(error_reply(error), close=True)
                return None
            if event is not h11.NEED_DATA:
                assert isinstance(event, h11.Event), "h11 pauses only between cycles"
                return event
            await self._receive()

    async def _read_body(self) -> bytes | None:
        """The whole request body; None when it was refused (too large or malformed) and the
        refusal answered, so the request must not be answered (nor acted on)."""
        body = bytearray()
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    await self._send(
                        error_reply(HttpError(413, "request body too large")), close=True
                    )
                    return None
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:  # a refusal already answered
                return None

    async def _send(self, reply: Reply, *, close: bool) -> None:
        if self._http.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers = [
            *reply.headers,
            (b"content-type", reply.content_type),
            (b"content-length", str(len(reply.body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        if close:
            headers.append((b"connection", b"close"))
        try:
            for event in (
                response_head(reply.status, headers),
                h11.Data(data=reply.body),
                h11.EndOfMessage(),
            ):
                await self._stream.send_all(self._http.send(event) or b"")
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            return
