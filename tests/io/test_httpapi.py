"""petit.httpapi over real loopback sockets: a connection that goes wrong never reaches the
answer function or the other connections."""

from __future__ import annotations

from functools import partial

import trio

from petit.httpapi import Reply, Request, json_reply, serve_api
from tests.integration.harness import raw_exchange, reset_at_once


class Recorder:
    """An answer function that records the bodies it was asked to act on."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, request: Request) -> Reply:
        self.bodies.append(request.body)
        return json_reply({"success": True})


GET = b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


async def test_a_connection_reset_before_it_is_served_does_not_stop_the_server() -> None:
    answer = Recorder()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_api, answer, host="127.0.0.1", port=0))
        for _ in range(5):
            reset_at_once(port)  # blocking: the reset lands before the server accepts
        assert (await raw_exchange(port, GET)).startswith(b"HTTP/1.1 200 OK\r\n")
        nursery.cancel_scope.cancel()


async def test_a_request_whose_body_is_refused_is_not_acted_on() -> None:
    answer = Recorder()
    document = b'{"alias": "shop.example.com", "registeredId": "1"}'
    request = (
        b"POST /aliases HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(document):x}\r\n".encode()
        + document
        + b"\r\nnot-a-chunk-size\r\n\r\n"
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_api, answer, host="127.0.0.1", port=0))
        refused = await raw_exchange(port, request)
        assert refused.startswith(b"HTTP/1.1 400 "), refused[:200]
        assert refused.count(b"HTTP/1.1 ") == 1, refused
        assert (await raw_exchange(port, GET)).startswith(b"HTTP/1.1 200 ")
        nursery.cancel_scope.cancel()
    assert answer.bodies == [b""]  # only the GET was answered
