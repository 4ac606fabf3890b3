"""Faults behind and in front of a real server and client: a private service that hangs,
resets or stops mid-response, a STOP with a request in flight, and a caller that reads slowly.

Each fault must stay with its own request: a concurrent healthy request succeeds, no tunnel
stream or server task is left behind, and the server's memory does not grow with repetitions.
"""

from __future__ import annotations

import socket
import socketserver
import statistics
import struct
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import h11
import pytest
import trio

from tests.integration.harness import (
    SOAK,
    ClientFactory,
    PetitClient,
    PetitServer,
    PythonBackend,
    ServerFactory,
    edit_config,
    free_port,
    http_connection,
    http_request,
    payload,
    rss_kib,
    wait_exit,
    wait_pid_file,
    wait_until,
)

pytestmark = pytest.mark.integration

RESPONSE_TIMEOUT = 0.5  # seconds, the server's responseTimeout in the fault tests
REPETITIONS = 50
BATCH = 10  # faults at a time
RSS_GROWTH_LIMIT = 10 * 1024  # KiB over REPETITIONS faults
MIB = 1024 * 1024
WINDOW = 1 * MIB  # a stream's credit window


class FaultBackend:
    """A private service that misbehaves by path: ``/hang`` reads the request and never
    answers, ``/reset`` resets the connection (SO_LINGER 0), ``/half`` sends a head and part
    of the promised body then closes; anything else is a healthy 200.

    ``seen[path]`` counts the requests read, so a test knows a fault is under way.
    """

    HEALTHY = b"healthy\n"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: dict[str, int] = {}
        self.stopping = threading.Event()
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def count(self, path: str) -> int:
        with self.lock:
            return self.seen.get(path, 0)

    def close(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handler(self) -> type[socketserver.BaseRequestHandler]:
        backend = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                connection: socket.socket = self.request
                while (path := _read_request_path(connection)) is not None:
                    with backend.lock:
                        backend.seen[path] = backend.seen.get(path, 0) + 1
                    if not backend.answer(connection, path):
                        return

        return Handler

    def answer(self, connection: socket.socket, path: str) -> bool:
        """Act out ``path``; False once the connection is finished."""
        if path == "/hang":
            self.stopping.wait()
            return False
        if path == "/reset":
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.close()
            return False
        if path == "/half":
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
            connection.shutdown(socket.SHUT_RDWR)
            return False
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(self.HEALTHY)
        connection.sendall(head + self.HEALTHY)
        return True


def _read_request_path(connection: socket.socket) -> str | None:
    """The target of the next body-less request on ``connection``, or None at its end."""
    head = b""
    while b"\r\n\r\n" not in head:
        try:
            data = connection.recv(65536)
        except OSError:
            return None
        if not data:
            return None
        head += data
    return head.split(b" ", 2)[1].decode()


@pytest.fixture
def fault_backend() -> Iterator[FaultBackend]:
    backend = FaultBackend()
    yield backend
    backend.close()


async def server_streams(server: PetitServer, registration_id: str) -> int:
    """Tunnel streams open right now for a registration, as ``petit-server status ID`` says."""
    reply = await server.control(f"STATUS {registration_id}")
    connections = reply["connections"]
    assert isinstance(connections, list), reply
    return sum(int(session["streams"]) for session in connections[0]["sessions"])


async def server_tasks(server: PetitServer) -> int:
    """The server's live trio tasks, from its STATUS reply."""
    tasks = (await server.control("STATUS"))["tasks"]
    assert isinstance(tasks, int), tasks
    return tasks


async def expect_hang(server: PetitServer, client: PetitClient) -> None:
    started = trio.current_time()
    response = await http_request(server.http_port, client.host, target="/hang", timeout=10)
    assert response.status == 504, response
    assert trio.current_time() - started < RESPONSE_TIMEOUT + 5


async def expect_reset(server: PetitServer, client: PetitClient) -> None:
    response = await http_request(server.http_port, client.host, target="/reset", timeout=10)
    assert response.status == 502, response


async def expect_half(server: PetitServer, client: PetitClient) -> None:
    with trio.fail_after(10):
        async with http_connection(server.http_port) as connection:
            await connection.send_request(client.host, target="/half")
            head = await connection.receive_head()
            assert head.status_code == 200, head
            with pytest.raises(h11.RemoteProtocolError):  # closed before the promised body
                await connection.receive_body()


FAULTS: dict[str, Callable[[PetitServer, PetitClient], Awaitable[None]]] = {
    "/hang": expect_hang,
    "/reset": expect_reset,
    "/half": expect_half,
}


@pytest.mark.parametrize("path", list(FAULTS))
async def test_backend_fault_stays_with_its_request(
    path: str,
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    fault_backend: FaultBackend,
) -> None:
    server = await server_factory(responseTimeout=RESPONSE_TIMEOUT)
    client = await client_factory(server, fault_backend.port)
    fault = FAULTS[path]

    async def once(index: int) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fault, server, client)
            await wait_until(
                lambda: fault_backend.count(path) > index, 10, what=f"{path} to reach the backend"
            )
            healthy = await http_request(server.http_port, client.host, target="/ok", timeout=10)
            assert healthy.status == 200, healthy
            assert healthy.body == FaultBackend.HEALTHY

    async def streams_closed() -> bool:
        return await server_streams(server, client.registration_id) == 0

    await once(0)  # warm-up: imports, buffers
    await wait_until(streams_closed, 10, what="the server to close every stream")
    before, tasks_before = rss_kib(server.pid), await server_tasks(server)
    for batch in range(1, REPETITIONS + 1, BATCH):
        async with trio.open_nursery() as nursery:
            for index in range(batch, batch + BATCH):
                nursery.start_soon(once, index)
    await wait_until(streams_closed, 10, what="the server to close every stream")
    tasks_after: list[int] = []

    async def tasks_back() -> bool:
        tasks_after[:] = [await server_tasks(server)]
        return tasks_after[0] <= tasks_before

    try:
        await wait_until(tasks_back, 10, what="the server's task count to come back")
    except AssertionError:
        raise AssertionError(
            f"{path}: {tasks_after[0] - tasks_before} server tasks left over "
            f"after {REPETITIONS} faults ({tasks_before} before)"
        ) from None
    growth = rss_kib(server.pid) - before
    print(
        f"{path}: server RSS {before} KiB, +{growth} KiB and {tasks_before} -> "
        f"{tasks_after[0]} tasks after {REPETITIONS} faults"
    )
    assert growth < RSS_GROWTH_LIMIT, f"server RSS grew {growth} KiB over {REPETITIONS} faults"


async def test_stop_lets_the_request_in_flight_finish_and_the_client_comes_back(
    tmp_path: Path,
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    python_backend: PythonBackend,
) -> None:
    server = await server_factory(start=False)
    pin_ports(server)
    child = await start_foreground(server, tmp_path / "first.log")
    client = await client_factory(server, python_backend.port)
    first = await client.wait_connected()
    slow = f"/slow/{64 * 1024}"  # ~1 s: ten pieces 0.1 s apart
    responses = []

    async def call() -> None:
        responses.append(await http_request(server.http_port, client.host, target=slow))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await wait_until(lambda: python_backend.progress(slow) > 0, 10, what="the slow response")
        await server.cli("stop")
        assert await wait_exit(child) == 0
    assert responses[0].status == 200, responses[0]
    assert responses[0].body == payload(64 * 1024)

    child = await start_foreground(server, tmp_path / "second.log")
    await client.wait_connected(not_since=first.get("connectedSince"))
    response = await http_request(server.http_port, client.host, target="/bytes/1000")
    assert response.status == 200, response
    assert response.body == payload(1000)
    await server.cli("stop")
    assert await wait_exit(child) == 0


async def start_foreground(server: PetitServer, log: Path) -> subprocess.Popen[bytes]:
    """``start --foreground`` as our child (for its exit status), once it is ready."""
    child = server.spawn_foreground(log)
    server.adopt(await wait_pid_file(server.directory, "server", child, log))
    return child


def pin_ports(server: PetitServer) -> None:
    """Fixed ports, so a restarted server is where its clients and callers look."""
    edit_config(
        server.config, "server", backPort=free_port(), proxyPort=free_port(), listenPort=free_port()
    )


async def download(port: int, host: str, target: str, *, rate: float | None = None) -> int:
    """GET ``target`` on a raw connection, reading at most ``rate`` bytes/s; bytes received.

    Pacing is the load shape (a slow reader), not synchronisation.
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = 0
    async with stream:
        await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        started = trio.current_time()
        while data := await stream.receive_some(64 * 1024):
            received += len(data)
            if rate is not None:
                await trio.sleep_until(started + received / rate)
    return received


@dataclass(frozen=True)
class SlowCallerShape:
    """One slow caller beside fast ones: what each downloads and how the result is judged."""

    slow_size: int  # bytes the slow caller asks for (it is cut off once the fast ones are done)
    slow_rate: int  # bytes/s it reads
    fast_size: int  # bytes per fast download
    fast_rounds: int  # fast downloads per phase
    phases: int  # alone/beside pairs, interleaved, so a neighbour's burst hits both alike
    min_ratio: float  # median fast throughput beside the slow caller / alone, at least


# The suite's short run; PETIT_SOAK=1 runs the shape: 100 MiB at 100 KiB/s, within 10%.
SLOW_CALLER = (
    SlowCallerShape(100 * MIB, 100 * 1024, 10 * MIB, 14, 3, 0.9)
    if SOAK
    else SlowCallerShape(20 * MIB, MIB, 10 * MIB, 2, 5, 0.7)
)
SERVER_OVERHEAD = 8 * MIB  # RSS the server may add beyond the windows of the streams in flight
SETTLE_POLL = 0.1  # seconds between readings of the slow download's progress


def _settled(progress: Callable[[], int], rate: float) -> Callable[[], bool]:
    """A predicate for ``wait_until(..., poll=SETTLE_POLL)``: true once ``progress`` (bytes the
    backend wrote) passed two windows and grew by less than ``rate`` bytes/s since the last
    reading. The windows and buffers of a new download fill at the link's speed; measured
    while that lasts, the fast callers shared the tunnel with several MiB of it."""
    last = progress()

    def check() -> bool:
        nonlocal last
        previous, last = last, progress()
        return last > 2 * WINDOW and last - previous < rate * SETTLE_POLL

    return check


async def test_slow_caller_does_not_slow_a_fast_one(
    server_factory: ServerFactory,
    client_factory: ClientFactory,
    python_backend: PythonBackend,
) -> None:
    """Fast downloads alone and beside a slow caller, in interleaved phases (alone first, then
    beside first, ...), are compared by their medians, so the measure resists the bursts of
    whatever else the machine runs; the server's RSS is sampled throughout."""
    shape = SLOW_CALLER
    server = await server_factory()
    client = await client_factory(server, python_backend.port)
    # A fresh size per phase: the backend's progress counter of a cancelled caller stays behind.
    slow_sizes = [shape.slow_size + phase for phase in range(shape.phases)]
    for size in (shape.fast_size, *slow_sizes):
        payload(size)  # the backend's bodies, made before timing
    peak_rss = 0
    samples: dict[bool, list[float]] = {False: [], True: []}  # beside slow -> bytes/s

    async def fast_downloads(beside_slow: bool) -> None:
        nonlocal peak_rss
        for _ in range(shape.fast_rounds):
            started = trio.current_time()
            response = await http_request(
                server.http_port, client.host, target=f"/bytes/{shape.fast_size}"
            )
            samples[beside_slow].append(shape.fast_size / (trio.current_time() - started))
            assert response.status == 200, response.status
            assert response.body == payload(shape.fast_size)
            peak_rss = max(peak_rss, rss_kib(server.pid))

    async def beside_a_slow_caller(slow_size: int) -> None:
        slow_target = f"/bytes/{slow_size}"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(download, rate=shape.slow_rate),
                server.http_port,
                client.host,
                slow_target,
            )
            await wait_until(
                _settled(lambda: python_backend.progress(slow_target), 2 * shape.slow_rate),
                10,
                what="the slow download to fill its windows and slow to its reader's pace",
                poll=SETTLE_POLL,
            )
            await fast_downloads(beside_slow=True)
            # still held back by the slow caller, so the fast ones ran beside it throughout
            assert python_backend.progress(slow_target) < slow_size
            nursery.cancel_scope.cancel()

    warm_up = await http_request(server.http_port, client.host, target=f"/bytes/{shape.fast_size}")
    assert warm_up.status == 200, warm_up.status
    before = rss_kib(server.pid)
    for phase, slow_size in enumerate(slow_sizes):
        if phase % 2:
            await beside_a_slow_caller(slow_size)
            await fast_downloads(beside_slow=False)
        else:
            await fast_downloads(beside_slow=False)
            await beside_a_slow_caller(slow_size)
    growth = peak_rss - before
    alone, beside_slow = (statistics.median(samples[beside]) for beside in (False, True))
    ratio = beside_slow / alone
    print(
        f"fast callers {alone / MIB:.0f} MiB/s alone, {beside_slow / MIB:.0f} MiB/s beside a "
        f"{shape.slow_rate // 1024} KiB/s caller (medians of {len(samples[True])}; ratio "
        f"{ratio:.2f}); server RSS peak +{growth} KiB"
    )
    assert ratio >= shape.min_ratio, f"fast callers slowed to {ratio:.0%} of their speed alone"
    bound = (2 * WINDOW + SERVER_OVERHEAD) // 1024  # the slow and a fast stream in flight
    assert growth < bound, f"server RSS grew {growth} KiB (bound {bound} KiB)"
