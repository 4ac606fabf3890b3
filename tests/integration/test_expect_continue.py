"""Expect: 100-continue goes to the private service, which decides: a 100 lets the body come,
a final status refuses it before a byte of it is sent (a real server and client; the caller
and the service speak raw HTTP on loopback sockets, so every status line is seen)."""

from __future__ import annotations

import h11
import pytest
import trio

from tests.integration.harness import ClientFactory, PetitServer

pytestmark = pytest.mark.integration

TIMEOUT = 20.0  # seconds per exchange
BODY = b"x" * 4096


async def deciding_service(stream: trio.SocketStream) -> None:
    """/refuse: 413 on the head, no body read. Anything else: 100, then the body's length."""
    http = h11.Connection(h11.SERVER)
    async with stream:
        while (event := http.next_event()) is h11.NEED_DATA:
            http.receive_data(await stream.receive_some())
        assert isinstance(event, h11.Request)
        if event.target == b"/refuse":
            answer = [h11.Response(status_code=413, headers=[("Content-Length", "0")])]
            await stream.send_all(
                b"".join(http.send(e) or b"" for e in [*answer, h11.EndOfMessage()])
            )
            return
        assert http.they_are_waiting_for_100_continue, "the Expect did not reach the service"
        await stream.send_all(
            http.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
        )
        size = 0
        while not isinstance(event := http.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                http.receive_data(await stream.receive_some())
            elif isinstance(event, h11.Data):
                size += len(event.data)
        body = str(size).encode()
        for reply in (
            h11.Response(status_code=200, headers=[("Content-Length", str(len(body)))]),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            await stream.send_all(http.send(reply) or b"")


async def read_status(stream: trio.SocketStream, received: bytearray) -> bytes:
    """The status code of the next response head in ``received`` + the stream."""
    while b"\r\n\r\n" not in received:
        chunk = await stream.receive_some()
        assert chunk, f"closed after {bytes(received)!r}"
        received += chunk
    head, _, rest = bytes(received).partition(b"\r\n\r\n")
    received[:] = rest
    return head.split(b" ", 2)[1]


@pytest.mark.parametrize(
    ("target", "expected"),
    [("/upload", [b"100", b"200"]), ("/refuse", [b"413"])],  # the statuses the caller sees
)
async def test_the_private_service_answers_the_expect(
    target: str,
    expected: list[bytes],
    server: PetitServer,
    client_factory: ClientFactory,
    nursery: trio.Nursery,
) -> None:
    listeners = await nursery.start(trio.serve_tcp, deciding_service, 0)
    client = await client_factory(server, listeners[0].socket.getsockname()[1])
    head = (
        f"POST {target} HTTP/1.1\r\nHost: {client.host}\r\nContent-Length: {len(BODY)}\r\n"
        "Expect: 100-continue\r\n\r\n"
    ).encode()
    with trio.fail_after(TIMEOUT):
        async with await trio.open_tcp_stream("127.0.0.1", server.http_port) as caller:
            await caller.send_all(head)  # and nothing more until an answer: the body waits
            received = bytearray()
            first = await read_status(caller, received)
            assert first == expected[0]  # from the service: petit sends no 100 of its own
            if first == b"100":
                await caller.send_all(BODY)
                assert await read_status(caller, received) == expected[1]
