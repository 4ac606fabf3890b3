"""Real processes on loopback for the integration tests: CLIs, daemons, backends, HTTP calls.

Everything here waits with a bound: ``wait_until`` polls a condition under a deadline, CLI
runs have timeouts, and every process started is registered with a ``Reaper`` that kills its
whole process group at teardown, whether the test passed or not.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import inspect
import json
import os
import random
import re
import shutil
import signal
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import threading
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import h11
import redis
import tomli_w
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from petit import messages
from petit.auth import (
    load_private_key,
)
from petit.control import send_control
from petit.lockfile import PidInfo, read_pid
from petit.pki import client_ssl_context
from petit.transport import ServerAddress, open_websocket

BIN = Path(sys.executable).parent
PETIT_SERVER = BIN / "petit-server"
PETIT_CLIENT = BIN / "petit-client"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
)

CLI_TIMEOUT = 30.0  # seconds for one CLI command
READY_TIMEOUT = 15.0  # seconds for a daemon to publish its ports, or a client to connect
EXIT_TIMEOUT = 15.0  # seconds for a stopped daemon to exit
PING_INTERVAL = 0.5  # seconds, server and client pingInterval in every test config
RECONNECT_MAX_DELAY = 1.0  # seconds, client reconnectMaxDelay (default 5) to keep tests short
UNAVAILABLE = b'{"g2c":"unavailable"}'
SOAK = os.environ.get("PETIT_SOAK") == "1"  # the long variants of the fault tests

Predicate = Callable[[], bool | Awaitable[bool]]


# ----------------------------------------------------------------------------- waiting


async def wait_until(
    predicate: Predicate, timeout: float, *, what: str, poll: float = 0.02
) -> None:
    """Poll ``predicate`` until it is true; fail the test if ``timeout`` seconds pass first."""
    with trio.move_on_after(timeout):
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await trio.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def free_port() -> int:
    """A loopback port nothing listens on right now (for the few places port 0 cannot go)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def free_port_block(count: int = 8) -> int:
    """The first of ``count`` consecutive ports free on every address, for a server's
    ``firstPort``. Drawn below Linux's ephemeral range (32768 and up), where outgoing
    connections of tests running beside this one take their local ports, and away from the
    default 11081, so parallel tests do not bind each other's registration ports."""
    rng = random.Random()
    for _ in range(100):
        first = rng.randrange(20_000, 32_000, count)
        try:
            for port in range(first, first + count):
                with socket.socket() as probe:
                    probe.bind(("0.0.0.0", port))
        except OSError:
            continue
        return first
    raise AssertionError(f"no block of {count} free ports found")


def reset_at_once(port: int) -> None:
    """Connect to a loopback port and close with SO_LINGER 0 (an RST), blocking, so the
    server accepts a connection that is already reset."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def tail(path: Path, lines: int = 30) -> str:
    """The end of a log file, for assertion messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} does not exist)"


def log_records(path: Path) -> list[dict[str, Any]]:
    """The JSON-lines records of a petit log or audit file (each line must parse)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line]


# ----------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class CliResult:
    """A finished command."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"$ {' '.join(self.argv)}\nexit {self.returncode}\n"
            f"stdout: {self.stdout.strip()}\nstderr: {self.stderr.strip()}"
        )


async def run_cli(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    stdin: bytes = b"",
    timeout: float = CLI_TIMEOUT,
    env: dict[str, str] | None = None,
) -> CliResult:
    """Run a command to completion (killed after ``timeout``); fail the test if check and rc≠0.

    ``env`` adds variables to the inherited environment.
    """
    args = [os.fspath(a) for a in argv]
    with trio.fail_after(timeout):
        done = await trio.run_process(
            args,
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=None if env is None else {**os.environ, **env},
        )
    result = CliResult(
        args,
        done.returncode,
        done.stdout.decode(errors="replace"),
        done.stderr.decode(errors="replace"),
    )
    if check and result.returncode != 0:
        raise AssertionError(f"command failed:\n{result}")
    return result


def _is_petit_process(pid: int) -> bool:
    try:
        return b"petit_" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def kill_group(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Signal a process group; nothing if it is gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class Reaper:
    """Every process a test starts; ``reap()`` kills their process groups (fixture teardown)."""

    def __init__(self) -> None:
        self._children: list[subprocess.Popen[bytes]] = []
        self._daemons: set[int] = set()

    def spawn(
        self, argv: Sequence[str | os.PathLike[str]], *, log: Path
    ) -> subprocess.Popen[bytes]:
        """Start a child in its own session, output to ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as output:
            child = subprocess.Popen(
                [os.fspath(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._children.append(child)
        return child

    def track_daemon(self, pid: int) -> None:
        """A daemon that ``start`` detached (its own session: pgid == pid)."""
        self._daemons.add(pid)

    def reap(self) -> None:
        """Kill whatever still runs."""
        for child in self._children:
            if child.poll() is None:
                kill_group(child.pid)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=10)
        for pid in self._daemons:
            if _is_petit_process(pid):  # not a recycled pid: it is still our daemon
                kill_group(pid)


def rss_kib(pid: int) -> int:
    """A process's resident set size (VmRSS), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


async def wait_exit(child: subprocess.Popen[bytes], timeout: float = EXIT_TIMEOUT) -> int:
    """Wait for a child we spawned to exit; return its exit status."""
    await wait_until(lambda: child.poll() is not None, timeout, what=f"pid {child.pid} to exit")
    assert child.returncode is not None
    return child.returncode


async def wait_pid_file(
    directory: Path, name: str, child: subprocess.Popen[bytes], log: Path
) -> PidInfo:
    """Wait until the foreground daemon ``child`` published a ready pid file."""
    found: list[PidInfo] = []

    def ready() -> bool:
        if child.poll() is not None:
            raise AssertionError(f"{name} exited with {child.returncode}:\n{tail(log)}")
        info = read_pid(directory, name)
        if info is not None and info.pid == child.pid and info.extra.get("ready"):
            found.append(info)
            return True
        return False

    await wait_until(ready, READY_TIMEOUT, what=f"{name} pid {child.pid} to be ready")
    return found[0]


def edit_config(path: Path, table: str, **values: object) -> None:
    """Set keys of the top-level ``[table]`` of a TOML config (the one config-editing helper)."""
    document = tomllib.loads(path.read_text())
    document[table].update(values)
    path.write_text(tomli_w.dumps(document))


# ----------------------------------------------------------------------------- petit


@dataclass
class PetitServer:
    """A ``petit-server`` in its own directory, driven through its CLI."""

    directory: Path
    reaper: Reaper
    pid: int = 0
    ports: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, CliResult] = field(default_factory=dict)

    @property
    def config(self) -> Path:
        return self.directory / "config.toml"

    @property
    def ca(self) -> Path:
        return self.directory / "certificates" / "ca.crt"

    @property
    def registry(self) -> Path:
        return self.directory / "registry.json"

    @property
    def log(self) -> Path:
        return self.directory / "logs" / "server.log"

    @property
    def audit_log(self) -> Path:
        return self.directory / "logs" / "audit.log"

    @property
    def tunnel_port(self) -> int:
        return self.ports["tunnel"]

    @property
    def http_port(self) -> int:
        return self.ports["http"]

    @property
    def control_port(self) -> int:
        return self.ports["control"]

    async def cli(self, *args: str, check: bool = True, timeout: float = CLI_TIMEOUT) -> CliResult:
        """``petit-server ARGS -c CONFIG``."""
        return await run_cli([PETIT_SERVER, *args, "-c", self.config], check=check, timeout=timeout)

    async def init(self, **settings: object) -> None:
        """``init``, then loopback-only, system-chosen ports and a short ping interval."""
        self.outputs["init"] = await self.cli("init", "--hostname", "localhost")
        values: dict[str, object] = {
            "bindAddr": "127.0.0.1",
            "backPort": 0,
            "proxyPort": 0,
            "listenPort": 0,
            "adminPort": 0,
            "pingInterval": PING_INTERVAL,
            "requireToken": False,  # the token tests ask for it; the rest register freely
            "registrationsPerMinute": 1_000_000,  # tests register many clients from loopback
        }
        edit_config(self.config, "server", **{**values, **settings})

    def running(self) -> PidInfo | None:
        """The live server's pid file, or None."""
        return read_pid(self.directory, "server")

    def adopt(self, info: PidInfo) -> None:
        """Take the pid and the bound ports from a pid file."""
        ports = info.extra["ports"]
        assert isinstance(ports, dict), info
        self.pid = info.pid
        self.ports = {str(k): int(v) for k, v in ports.items()}

    async def start(self) -> None:
        """``start`` (backgrounds, returns once ready)."""
        result = await self.cli("start")
        self.outputs["start"] = result
        match = re.search(r"Server started with pid (\d+)\.", result.stdout)
        assert match, result
        self.reaper.track_daemon(int(match[1]))
        info = self.running()
        assert info is not None, f"no live pid file after start\n{tail(self.log)}"
        assert info.pid == int(match[1]), (info, result)
        self.adopt(info)

    async def stop(self) -> None:
        """``stop``; the daemon is gone and its lock and pid files are removed."""
        result = await self.cli("stop")
        assert "stopped" in result.stdout, result
        assert self.running() is None
        assert not (self.directory / "server.pid").exists()
        assert not (self.directory / "server.lock").exists()

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        kill_group(self.pid, sig)

    async def control(self, command: str) -> dict[str, object]:
        """A command on the control port, in-process (what ``petit-server status`` sends)."""
        with trio.fail_after(5):
            return await send_control("127.0.0.1", self.control_port, command)

    @property
    def admin_port(self) -> int:
        return self.ports["admin"]

    @property
    def admin_token(self) -> str:
        """The admin API's bearer token, as ``init`` wrote it into the config."""
        token = tomllib.loads(self.config.read_text())["server"]["adminToken"]
        assert isinstance(token, str)
        return token

    async def admin(
        self, path: str, *, method: str = "GET", body: bytes = b"", token: str | None = ""
    ) -> HttpResponse:
        """One admin API request, bearing the server's token; ``token`` another one, or None
        for no Authorization header at all."""
        bearer = self.admin_token if token == "" else token
        headers = [] if bearer is None else [("Authorization", f"Bearer {bearer}")]
        return await http_request(
            self.admin_port, "127.0.0.1", method, path, body, headers=headers, timeout=10
        )

    async def admin_json(self, path: str) -> dict[str, Any]:
        """GET an admin endpoint that must answer 200 with a JSON object."""
        response = await self.admin(path)
        assert response.status == 200, (path, response)
        document = json.loads(response.body)
        assert isinstance(document, dict), document
        return document

    async def sessions_of(self, registration_id: str) -> int:
        """How many tunnel sessions serve a registration right now."""
        reply = await self.control(f"STATUS {registration_id}")
        connections = reply["connections"]
        assert isinstance(connections, list), reply
        sessions = connections[0]["sessions"]
        assert isinstance(sessions, list), reply
        return len(sessions)

    def spawn_foreground(
        self, log: Path, *, wrapper: Sequence[str] = ()
    ) -> subprocess.Popen[bytes]:
        """``start --foreground`` as our own child (for exit statuses); ``wrapper`` runs it
        (``prlimit --nofile=64:64``, say)."""
        return self.reaper.spawn(
            [*wrapper, PETIT_SERVER, "start", "--foreground", "-c", self.config], log=log
        )


@dataclass
class PetitClient:
    """A ``petit-client`` in its own directory, driven through its CLI."""

    directory: Path
    server: PetitServer
    reaper: Reaper
    registration_id: str = ""
    pid: int = 0
    control_port: int = 0
    outputs: dict[str, CliResult] = field(default_factory=dict)

    @property
    def config(self) -> Path:
        return self.directory / "config.toml"

    @property
    def log(self) -> Path:
        return self.directory / "logs" / "client.log"

    @property
    def audit_log(self) -> Path:
        return self.directory / "logs" / "client-audit.log"

    @property
    def host(self) -> str:
        """The public Host that routes to this client's default registration."""
        return f"{self.registration_id}.localhost"

    async def cli(self, *args: str, check: bool = True, timeout: float = CLI_TIMEOUT) -> CliResult:
        """``petit-client ARGS -c CONFIG``."""
        return await run_cli([PETIT_CLIENT, *args, "-c", self.config], check=check, timeout=timeout)

    async def init(self, backend_port: int) -> None:
        """``init`` against the server's tunnel port and CA, then test settings."""
        self.outputs["init"] = await self.cli(
            "init",
            "--server",
            f"127.0.0.1:{self.server.tunnel_port}",
            "--ca",
            str(self.server.ca),
            "--local",
            f"127.0.0.1:{backend_port}",
        )
        edit_config(
            self.config,
            "client",
            listenPort=0,
            statusPort=0,
            pingInterval=PING_INTERVAL,
            reconnectMaxDelay=RECONNECT_MAX_DELAY,
        )

    async def register(self, tenant: str | None = None) -> str:
        """``register [-t TENANT]``; return the ID it printed (the first one becomes ours)."""
        result = await self.cli("register", *(["-t", tenant] if tenant else []))
        self.outputs["register" if tenant is None else f"register {tenant}"] = result
        match = re.search(r"Registered with ID (\d+)", result.stdout)
        assert match, result
        if not self.registration_id:
            self.registration_id = match[1]
        return match[1]

    def key(self, tenant: str = "default") -> Ed25519PrivateKey:
        """A registration's private key, as the client stored it."""
        return load_private_key((self.directory / "tenants" / tenant / "key").read_bytes())

    def running(self) -> PidInfo | None:
        return read_pid(self.directory, "client")

    def adopt(self, info: PidInfo) -> None:
        self.pid = info.pid
        self.control_port = info.listen

    async def start(self, *, wait_connected: bool = True) -> None:
        """``start`` (backgrounds); by default wait until the tunnel is up."""
        result = await self.cli("start")
        self.outputs["start"] = result
        match = re.search(r"Client started on pid (\d+)\.", result.stdout)
        assert match, result
        self.reaper.track_daemon(int(match[1]))
        info = self.running()
        assert info is not None, f"no live pid file after start\n{tail(self.log)}"
        assert info.pid == int(match[1]), (info, result)
        self.adopt(info)
        if wait_connected:
            await self.wait_connected()

    async def control_status(self) -> dict[str, object]:
        """STATUS on the control port, in-process (what ``petit-client status`` sends)."""
        with trio.fail_after(5):
            return await send_control("127.0.0.1", self.control_port, "STATUS")

    async def status(self) -> dict[str, object]:
        """``petit-client status``, parsed."""
        document = json.loads((await self.cli("status", "--json")).stdout)
        assert isinstance(document, dict)
        return document

    async def wait_connected(
        self, timeout: float = READY_TIMEOUT, *, not_since: object = None
    ) -> dict[str, object]:
        """Wait for status "connected" (of a session newer than ``not_since``); return it."""
        seen: list[dict[str, object]] = []

        async def connected() -> bool:
            status = await self.control_status()
            seen[:] = [status]
            since = status.get("connectedSince")
            return status.get("status") == "connected" and since != not_since

        try:
            await wait_until(connected, timeout, what=f"client {self.registration_id} to connect")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last status {seen}\n{tail(self.log)}") from None
        return seen[0]

    async def stop(self) -> None:
        """``stop``; the daemon is gone and its lock and pid files are removed."""
        result = await self.cli("stop")
        assert "stopped" in result.stdout, result
        assert self.running() is None
        assert not (self.directory / "client.pid").exists()
        assert not (self.directory / "client.lock").exists()

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        kill_group(self.pid, sig)

    def spawn_foreground(self, log: Path) -> subprocess.Popen[bytes]:
        """``start --foreground`` as our own child (for exit statuses)."""
        return self.reaper.spawn(
            [PETIT_CLIENT, "start", "--foreground", "-c", self.config], log=log
        )


class ServerFactory:
    """``await server_factory(start=True, **config_overrides)`` → a PetitServer."""

    def __init__(self, root: Path, reaper: Reaper) -> None:
        self._root = root
        self._reaper = reaper
        self._count = 0

    async def __call__(self, *, start: bool = True, **settings: object) -> PetitServer:
        self._count += 1
        server = PetitServer(self._root / f"server{self._count}", self._reaper)
        await server.init(**settings)
        if start:
            await server.start()
        return server


class ClientFactory:
    """``await client_factory(server, backend_port)`` → an initialised, registered client.

    With ``start=True`` (default) it is also started and connected.
    """

    def __init__(self, root: Path, reaper: Reaper) -> None:
        self._root = root
        self._reaper = reaper
        self._count = 0

    async def __call__(
        self, server: PetitServer, backend_port: int, *, start: bool = True
    ) -> PetitClient:
        self._count += 1
        client = PetitClient(self._root / f"client{self._count}", server, self._reaper)
        await client.init(backend_port)
        await client.register()
        if start:
            await client.start()
        return client


# ----------------------------------------------------------------------------- HTTP callers


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode()
        return next((v.decode("latin-1") for n, v in self.headers if n == wanted), None)


class HttpConnection:
    """One public HTTP/1.1 connection (h11 over a trio socket); several requests may share it."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.http = h11.Connection(h11.CLIENT)

    async def send(self, event: h11.Event) -> None:
        data = self.http.send(event)
        if data:
            await self.stream.send_all(data)

    async def next_event(self) -> h11.Event:
        while True:
            event = self.http.next_event()
            if event is h11.NEED_DATA:
                self.http.receive_data(await self.stream.receive_some(256 * 1024))
                continue
            assert isinstance(event, h11.Event), event
            return event

    async def send_request(
        self,
        host: str,
        method: str = "GET",
        target: str = "/",
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        if self.http.our_state is h11.DONE and self.http.their_state is h11.DONE:
            self.http.start_next_cycle()
        all_headers = [("Host", host), *headers]
        if body or method in ("POST", "PUT"):
            all_headers.append(("Content-Length", str(len(body))))
        await self.send(h11.Request(method=method, target=target, headers=all_headers))
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())

    async def receive_head(self) -> h11.Response:
        """The response head; h11.RemoteProtocolError if the server closed without one (a
        server being killed does that: callers that expect it catch h11's errors)."""
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Response):
                return event
            if isinstance(event, h11.ConnectionClosed):
                raise h11.RemoteProtocolError("the server closed the connection without a response")
            if not isinstance(event, h11.InformationalResponse):
                raise AssertionError(f"expected a response, got {event!r}")

    async def receive_body(self) -> bytes:
        body = bytearray()
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                raise AssertionError(f"expected body data, got {event!r}")

    async def request(
        self,
        host: str,
        method: str = "GET",
        target: str = "/",
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
    ) -> HttpResponse:
        """Send a request and read its response concurrently (no deadlock on large bodies)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.send_request, host, method, target, body, headers)
            head = await self.receive_head()
            response_body = await self.receive_body()
        return HttpResponse(head.status_code, list(head.headers), response_body)


@asynccontextmanager
async def http_connection(port: int) -> AsyncIterator[HttpConnection]:
    """A connection to 127.0.0.1:port."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        yield HttpConnection(stream)


async def raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection to 127.0.0.1; every byte answered until the
    server closes (so the request should ask to close)."""
    with trio.fail_after(10):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(request)
            answer = bytearray()
            while chunk := await stream.receive_some(65536):
                answer += chunk
            return bytes(answer)


async def http_request(
    port: int,
    host: str,
    method: str = "GET",
    target: str = "/",
    body: bytes = b"",
    *,
    headers: Sequence[tuple[str, str]] = (),
    timeout: float = 30.0,
) -> HttpResponse:
    """One request on a fresh connection."""
    with trio.fail_after(timeout):
        async with http_connection(port) as connection:
            return await connection.request(host, method, target, body, headers)


def curl_url(port: int, host: str, path: str) -> list[str]:
    """curl arguments for http://HOST:PORT/PATH with HOST resolving to loopback."""
    return ["--resolve", f"{host}:{port}:127.0.0.1", f"http://{host}:{port}{path}"]


async def curl(*args: str, timeout: float = 60.0) -> CliResult:
    """Run curl (exit status checked; HTTP errors are not curl errors without --fail)."""
    return await run_cli(["curl", "--silent", "--show-error", *args], timeout=timeout)


# ----------------------------------------------------------------------------- backends


async def serve_on_loopback(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A small trio service on 127.0.0.1:0 (started with its port), each connection to
    ``handler``: for private services a test writes in a few lines."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


@functools.lru_cache(maxsize=8)
def payload(size: int) -> bytes:
    """The deterministic body ``/bytes/SIZE`` and ``/slow/SIZE`` serve."""
    return random.Random(size).randbytes(size)


class PythonBackend:
    """A threaded HTTP/1.1 backend on 127.0.0.1:0 (keep-alive).

    - ``GET /chunked``: a chunked response of ``CHUNKED_BODY``;
    - ``GET /bytes/N``: ``payload(N)`` as fast as the socket takes it;
    - ``GET /slow/N``: ``payload(N)`` in ``SLOW_PIECES`` pieces ``SLOW_PAUSE`` seconds apart;
    - ``POST`` anything: the request body echoed back;
    - ``GET``/``HEAD`` anything else: ``GET_BODY``.

    ``progress[path]`` counts the response bytes written so far, to see back-pressure.
    """

    GET_BODY = b"hello from the python backend\n"
    CHUNKED_PIECES = (b"first chunk\n", b"second chunk\n", bytes(range(256)) * 300, b"last\n")
    CHUNKED_BODY = b"".join(CHUNKED_PIECES)
    SLOW_PIECES = 10
    SLOW_PAUSE = 0.1  # seconds

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._server = _BackendServer(("127.0.0.1", 0), _BackendHandler)
        if tls is not None:  # HTTPS: the handshake happens in accept()
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def progress(self, path: str) -> int:
        with self._server.lock:
            return self._server.progress.get(path, 0)

    @property
    def connections(self) -> int:
        """How many TCP connections the backend accepted."""
        with self._server.lock:
            return self._server.connections

    def close(self) -> None:
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _BackendServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self.lock = threading.Lock()
        self.progress: dict[str, int] = {}
        self.connections = 0
        self.stopping = threading.Event()
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A caller gone mid-response (tests cut callers on purpose) is no error to print."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _BackendHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    @property
    def backend(self) -> _BackendServer:
        assert isinstance(self.server, _BackendServer)
        return self.server

    def setup(self) -> None:
        super().setup()
        with self.backend.lock:
            self.backend.connections += 1

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """Quiet."""

    def do_HEAD(self) -> None:
        self._get(head=True)

    def do_GET(self) -> None:
        self._get(head=False)

    def do_POST(self) -> None:
        body = self._read_body()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _get(self, *, head: bool) -> None:
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if not head:
                for piece in PythonBackend.CHUNKED_PIECES:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
            return
        if match := re.fullmatch(r"/(bytes|slow)/(\d+)", self.path):
            self._stream(payload(int(match[2])), slow=match[1] == "slow", head=head)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(PythonBackend.GET_BODY)))
        self.end_headers()
        if not head:
            self.wfile.write(PythonBackend.GET_BODY)

    def _stream(self, body: bytes, *, slow: bool, head: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        piece = -(-len(body) // PythonBackend.SLOW_PIECES) if slow else 64 * 1024
        for start in range(0, len(body), max(piece, 1)):
            if slow and start and self.backend.stopping.wait(PythonBackend.SLOW_PAUSE):
                return
            self.wfile.write(body[start : start + piece])
            with self.backend.lock:
                self.backend.progress[self.path] = start + len(body[start : start + piece])

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = bytearray()
            while size_line := self.rfile.readline():
                if not (size := int(size_line.split(b";")[0], 16)):
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
            else:  # the caller was cut off mid-body (tests do that on purpose)
                raise ConnectionAbortedError("the chunked body ended early")
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return bytes(body)
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))


NGINX_CONF = """\
{user}worker_processes 1;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/temp/body;
    proxy_temp_path {prefix}/temp/proxy;
    fastcgi_temp_path {prefix}/temp/fastcgi;
    uwsgi_temp_path {prefix}/temp/uwsgi;
    scgi_temp_path {prefix}/temp/scgi;
    client_max_body_size 0;
    keepalive_requests 1000;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {prefix}/www;
        location / {{ }}
    }}
}}
"""


@dataclass
class NginxBackend:
    """A real nginx serving ``www/`` (small.bin 1 KiB, large.bin 10 MiB, index.html)."""

    prefix: Path
    port: int
    child: subprocess.Popen[bytes]

    @property
    def www(self) -> Path:
        return self.prefix / "www"

    @property
    def error_log(self) -> Path:
        return self.prefix / "error.log"

    @classmethod
    async def start(cls, prefix: Path, reaper: Reaper) -> NginxBackend:
        assert NGINX is not None
        www = prefix / "www"
        (prefix / "temp").mkdir(parents=True)
        www.mkdir()
        rng = random.Random(2024)
        (www / "small.bin").write_bytes(rng.randbytes(1024))
        (www / "large.bin").write_bytes(rng.randbytes(10 * 1024 * 1024))
        (www / "index.html").write_text("<h1>nginx behind petit</h1>\n")
        port = free_port()
        # As root, workers would run as nobody and could not read pytest's 0700 temp dirs.
        user = "user root root;\n" if os.geteuid() == 0 else ""
        conf = prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(user=user, prefix=prefix, port=port))
        error_log = prefix / "error.log"
        argv = [NGINX, "-p", f"{prefix}/", "-e", str(error_log), "-c", str(conf)]
        argv += ["-g", f"daemon off; pid {prefix}/nginx.pid;"]
        child = reaper.spawn(argv, log=prefix / "nginx.out")

        async def answering() -> bool:
            if child.poll() is not None:
                raise AssertionError(f"nginx exited {child.returncode}:\n{tail(error_log)}")
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                return False
            await stream.aclose()
            return True

        await wait_until(answering, READY_TIMEOUT, what="nginx to listen")
        return cls(prefix, port, child)


# ----------------------------------------------------------------------------- signed requests

# (nonce, certificate fingerprint) -> the request; a str is sent as it is (malformed on purpose)
MakeRequest = Callable[[bytes, bytes], dict[str, object] | str]


async def signed_request(
    server: PetitServer, path: str, make_request: MakeRequest
) -> dict[str, object]:
    """One register/unregister exchange built in-process, as a hand-made client would: read
    the server's nonce, send ``make_request(nonce, certificate fingerprint)``, return the reply.
    """
    address = ServerAddress("127.0.0.1", server.tunnel_port)
    with trio.fail_after(10):
        async with open_websocket(address, client_ssl_context(server.ca), path) as (
            websocket,
            fingerprint,
        ):
            nonce = base64.b64decode(json.loads(await websocket.get_message())["nonce"])
            request = make_request(nonce, fingerprint)
            await websocket.send_message(
                request if isinstance(request, str) else json.dumps(request)
            )
            reply = json.loads(await websocket.get_message())
    assert isinstance(reply, dict), reply
    return reply


def register_request(
    key: Ed25519PrivateKey, **extra: object
) -> Callable[[bytes, bytes], dict[str, object]]:
    """A registration of ``key``, signed as petit-client signs it, with ``extra`` fields."""
    return lambda nonce, fingerprint: messages.register_request(key, nonce, fingerprint, **extra)


def unregister_request(
    key: Ed25519PrivateKey, registration_id: str
) -> Callable[[bytes, bytes], dict[str, object]]:
    """An unregistration of ``registration_id`` signed with ``key`` (its own, or not)."""
    return lambda nonce, fingerprint: messages.unregister_request(
        key, nonce, fingerprint, registration_id
    )


def registry_entry(server: PetitServer, registration_id: str) -> dict[str, Any] | None:
    """A registration as the server's registry file holds it right now, or None."""
    document = json.loads(server.registry.read_text())
    entry: dict[str, Any] | None = document["registrations"].get(registration_id)
    return entry


# ----------------------------------------------------------------------------- redis

REDIS_SERVER = shutil.which("redis-server")


@dataclass
class RedisServer:
    """A private redis-server on a free loopback port, its data (AOF) in its own directory.

    ``stop`` and ``start`` again keep the data, as a restarted production Redis would.
    """

    directory: Path
    reaper: Reaper
    port: int = field(default_factory=free_port)
    child: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A synchronous redis-py client (for setting up and inspecting data in tests)."""
        return redis.Redis(port=self.port, socket_timeout=5, decode_responses=True)

    async def start(self) -> None:
        """(Re)start on the same port with the data it had; return once it answers."""
        assert REDIS_SERVER is not None, "redis-server is not installed"
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--dir", str(self.directory), "--appendonly", "yes", "--daemonize", "no"]
        log = self.directory / "redis.log"
        child = self.child = self.reaper.spawn(argv, log=log)

        def answering() -> bool:
            if child.poll() is not None:
                raise AssertionError(f"redis-server exited {child.returncode}:\n{tail(log)}")
            try:
                with self.client() as client:
                    return bool(client.ping())
            except redis.ConnectionError:  # also BusyLoadingError, while it reads its AOF
                return False

        await wait_until(answering, READY_TIMEOUT, what="redis-server to answer")

    async def stop(self) -> None:
        """SIGTERM (Redis flushes its AOF) and wait for the exit."""
        assert self.child is not None
        self.child.terminate()
        await wait_exit(self.child)

    async def kill(self) -> None:
        """kill -9 (what was written survives in the AOF), and wait until it is gone."""
        assert self.child is not None
        kill_group(self.child.pid)
        await wait_exit(self.child)
