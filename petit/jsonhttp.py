"""A tiny read-only HTTP server answering ``GET`` with JSON documents, on loopback.

For status endpoints that scripts and monitoring poll with curl. HTTP is h11's; one request
per connection, answered and closed. Only a Host of ``localhost``, ``127.0.0.1`` or
``[::1]`` is served: a web page whose DNS name was rebound to 127.0.0.1 cannot read it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from functools import partial
from typing import Final, TypeAlias

import h11
import trio

MAX_HEAD: Final = 16 * 1024  # bytes of request head
REQUEST_TIMEOUT: Final = 10.0  # seconds a peer gets to send its request head
LOOPBACK_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "[::1]"})

Document: TypeAlias = Callable[[], Mapping[str, object]]
"""Builds the JSON object a path answers with, at request time."""

logger = logging.getLogger("petit.http")


async def serve_json(
    routes: Mapping[str, Document],
    *,
    host: str,
    port: int,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``routes`` (path → document) forever; ``task_status.started`` gets the port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(partial(_serve_connection, routes), listeners)


async def _serve_connection(routes: Mapping[str, Document], stream: trio.SocketStream) -> None:
    async with stream:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                request = await _receive_request(connection, stream)
                if request is None:
                    return
                status, body = _answer(routes, request)
                await _send(connection, stream, status, body)
        except h11.RemoteProtocolError as exc:
            if connection.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await _send(connection, stream, exc.error_status_hint, {"error": str(exc)})
        except (trio.BrokenResourceError, OSError) as exc:
            logger.debug("status connection lost: %s", exc)


async def _receive_request(
    connection: h11.Connection, stream: trio.SocketStream
) -> h11.Request | None:
    """The request head, or None if the peer closed first."""
    while True:
        event = connection.next_event()
        if isinstance(event, h11.Request):
            return event
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(MAX_HEAD))
        elif isinstance(event, h11.ConnectionClosed):
            return None


def _answer(
    routes: Mapping[str, Document], request: h11.Request
) -> tuple[int, Mapping[str, object]]:
    host = dict(request.headers).get(b"host", b"").decode("latin-1").lower()
    if host.rpartition(":")[0] not in LOOPBACK_HOSTS and host not in LOOPBACK_HOSTS:
        return 403, {"error": "only served to Host localhost, 127.0.0.1 or [::1]"}
    if request.method != b"GET":
        return 405, {"error": "only GET"}
    document = routes.get(request.target.decode("latin-1").partition("?")[0])
    if document is None:
        return 404, {"error": "not found", "paths": sorted(routes)}
    return 200, document()


async def _send(
    connection: h11.Connection,
    stream: trio.SocketStream,
    status: int,
    document: Mapping[str, object],
) -> None:
    body = json.dumps(document, indent=2).encode() + b"\n"
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        ("Connection", "close"),
    ]
    await stream.send_all(connection.send(h11.Response(status_code=status, headers=headers)))
    await stream.send_all(connection.send(h11.Data(data=body)))
    await stream.send_all(connection.send(h11.EndOfMessage()))
