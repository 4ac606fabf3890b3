"""Per-registration policies on a real server, client and backend, with curl as the visitor:
a long poll past the server's responseTimeout, allow and deny lists (HTTP and the TCP port),
a rate limit's 429 with Retry-After, a body limit, and a bandwidth cap each way."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio

from tests.integration.harness import (
    ClientFactory,
    PetitClient,
    PetitServer,
    PythonBackend,
    ServerFactory,
    curl,
    curl_url,
    free_port_block,
    http_request,
    serve_on_loopback,
)

pytestmark = pytest.mark.integration

SERVER_RESPONSE_TIMEOUT = 1.0  # seconds, the server's [server] responseTimeout
LONG_POLL = 2.0  # seconds the backend takes to answer /wait
TIMEOUT = 30.0  # seconds for each test


class SmallBackend:
    """A private service: ``/wait`` answers after LONG_POLL seconds; a POST's body is read
    and dropped (an upload); anything else is answered at once. Each answer is short."""

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        await serve_on_loopback(self._answer, task_status=task_status)

    async def _answer(self, stream: trio.SocketStream) -> None:
        async with stream:
            received = b""
            while b"\r\n\r\n" not in received and (data := await stream.receive_some()):
                received += data
            head, _, body = received.partition(b"\r\n\r\n")
            if head.startswith(b"GET /wait "):
                await trio.sleep(LONG_POLL)  # the service's own slowness, not synchronisation
            length = re.search(rb"(?im)^content-length: *([0-9]+)", head)
            left = (int(length[1]) if length else 0) - len(body)
            while left > 0 and (data := await stream.receive_some()):
                left -= len(data)
            answer = b"done\n"
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (len(answer), answer)
            )


async def set_policy(server: PetitServer, client: PetitClient, *assignments: str) -> None:
    reply = await server.control(f"POLICY {client.registration_id} {' '.join(assignments)}")
    assert reply["success"] is True, reply


async def status_and_headers(server: PetitServer, client: PetitClient, *args: str) -> list[str]:
    """curl's response head lines for a request to the client's registration."""
    result = await curl("--include", *args, *curl_url(server.http_port, client.host, "/"))
    head = result.stdout.split("\r\n\r\n", 1)[0]
    return head.split("\r\n")


async def test_a_long_poll_outlives_the_servers_timeout_where_its_policy_allows(
    server_factory: ServerFactory, client_factory: ClientFactory
) -> None:
    backend = SmallBackend()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(backend.serve)
        server = await server_factory(responseTimeout=SERVER_RESPONSE_TIMEOUT)
        patient = await client_factory(server, port)
        hasty = await client_factory(server, port)
        await set_policy(server, patient, f"responseTimeout={LONG_POLL * 5:g}")
        with trio.fail_after(TIMEOUT):
            allowed = await http_request(server.http_port, patient.host, target="/wait")
            cut = await http_request(server.http_port, hasty.host, target="/wait")
        assert (allowed.status, allowed.body) == (200, b"done\n")
        assert cut.status == 504
        nursery.cancel_scope.cancel()


async def test_visitor_lists_hold_on_http_and_on_the_tcp_port(
    server_factory: ServerFactory, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    # Registration ports of our own, so no server of a test beside this one answers there.
    server = await server_factory(firstPort=free_port_block(), tcpAddr="127.0.0.1")
    client = await client_factory(server, python_backend.port)
    assert (await status_and_headers(server, client))[0] == "HTTP/1.1 200 OK"

    await set_policy(server, client, "allow=10.0.0.0/8,2001:db8::/32")
    assert (await status_and_headers(server, client))[0] == "HTTP/1.1 403 Forbidden"
    assert python_backend.connections == 1  # the refused visitor reached nothing
    assert await tcp_port_answers(server, client) is False

    await set_policy(server, client, "allow=10.0.0.0/8,127.0.0.0/8")
    assert (await status_and_headers(server, client))[0] == "HTTP/1.1 200 OK"
    assert await tcp_port_answers(server, client) is True

    await set_policy(server, client, "deny=127.0.0.1/32")  # deny wins over allow
    assert (await status_and_headers(server, client))[0] == "HTTP/1.1 403 Forbidden"

    await set_policy(server, client, "allow=", "deny=")
    assert (await status_and_headers(server, client))[0] == "HTTP/1.1 200 OK"


async def tcp_port_answers(server: PetitServer, client: PetitClient) -> bool:
    """Whether an HTTP request on the registration's raw TCP port gets an answer."""
    reply = await server.control(f"STATUS {client.registration_id}")
    connections = reply["connections"]
    assert isinstance(connections, list), reply
    assert connections[0]["tcpListening"], reply
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", connections[0]["port"])
        async with stream:
            await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
            received = b""
            try:
                while chunk := await stream.receive_some():
                    received += chunk
            except trio.BrokenResourceError:
                pass
    return received.startswith((b"HTTP/1.0 200 ", b"HTTP/1.1 200 "))


async def test_a_rate_limit_answers_429_with_retry_after_per_visitor(
    server: PetitServer, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    client = await client_factory(server, python_backend.port)
    await set_policy(server, client, "rateLimit=0.2", "rateBurst=2")  # one per 5 s, 2 at once
    statuses = [(await status_and_headers(server, client))[0] for _ in range(3)]
    assert statuses == ["HTTP/1.1 200 OK"] * 2 + ["HTTP/1.1 429 Too Many Requests"]
    refused = await status_and_headers(server, client)
    assert refused[0] == "HTTP/1.1 429 Too Many Requests"
    (retry_after,) = [line for line in refused if line.lower().startswith("retry-after:")]
    assert 1 <= int(retry_after.split(":")[1]) <= 5, refused
    # Another visitor address has its own bucket.
    other = await curl(
        "--include",
        "--interface",
        "127.0.0.2",
        *curl_url(server.http_port, client.host, "/"),
    )
    assert other.stdout.startswith("HTTP/1.1 200 OK"), other.stdout


async def test_a_body_past_its_maximum_gets_413_before_the_service_sees_it(
    server: PetitServer, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    client = await client_factory(server, python_backend.port)
    await set_policy(server, client, "maxRequestBody=1000")
    url = curl_url(server.http_port, client.host, "/echo")
    small = await curl("--data-binary", "x" * 1000, *url)
    assert small.stdout == "x" * 1000
    declared = await curl("--include", "--data-binary", "x" * 1001, *url)
    assert declared.stdout.startswith("HTTP/1.1 413 "), declared.stdout
    chunked = await curl(
        "--include", "-H", "Transfer-Encoding: chunked", "--data-binary", "x" * 5000, *url
    )
    assert chunked.stdout.startswith("HTTP/1.1 413 "), chunked.stdout


CAP = 1_000_000  # bytes per second, the registration's bandwidth each way
CAPPED_SIZE = 3_000_000  # bytes: three seconds at the cap


async def test_a_bandwidth_cap_holds_each_way_within_ten_percent(
    server: PetitServer,
    client_factory: ClientFactory,
    python_backend: PythonBackend,
    tmp_path: Path,
) -> None:
    """curl's own average over 3 MB each way: a download from the python backend, an upload
    to a service that reads it and answers in five bytes."""
    uploads = SmallBackend()
    async with trio.open_nursery() as nursery:
        uploads_port = await nursery.start(uploads.serve)
        downloader = await client_factory(server, python_backend.port)
        uploader = await client_factory(server, uploads_port)
        for client in (downloader, uploader):
            await set_policy(server, client, f"bandwidth={CAP}")
        download = await curl(
            "--output",
            "/dev/null",
            "--write-out",
            "%{speed_download}",
            *curl_url(server.http_port, downloader.host, f"/bytes/{CAPPED_SIZE}"),
        )
        upload_file = tmp_path / "upload"
        upload_file.write_bytes(bytes(CAPPED_SIZE))
        upload = await curl(
            "--output",
            "/dev/null",
            "--write-out",
            "%{speed_upload}",
            "--header",
            "Expect:",  # no 100-continue wait: this service answers only once it has all
            "--data-binary",
            f"@{upload_file}",
            *curl_url(server.http_port, uploader.host, "/upload"),
        )
        nursery.cancel_scope.cancel()
    rates = {"download": float(download.stdout), "upload": float(upload.stdout)}
    print(f"bandwidth cap {CAP} B/s: {rates}")
    for way, rate in rates.items():
        assert 0.9 * CAP <= rate <= 1.1 * CAP, f"{way} at {rate:.0f} B/s under a {CAP} cap"


async def test_server_defaults_hold_until_a_registration_sets_its_own(
    server_factory: ServerFactory, client_factory: ClientFactory, python_backend: PythonBackend
) -> None:
    server = await server_factory(policy={"allow": ["10.0.0.0/8"], "rateLimit": 1000})
    client = await client_factory(server, python_backend.port)
    assert (await status_and_headers(server, client))[0] == "HTTP/1.1 403 Forbidden"
    await set_policy(server, client, "allow=127.0.0.0/8")  # replaces the default list, whole
    assert (await status_and_headers(server, client))[0] == "HTTP/1.1 200 OK"
