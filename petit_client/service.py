"""The client process: keep tunnel sessions up and splice their streams to local services.

With one server there is one session. With several (``servers``, for a cluster of server
nodes) the client keeps ``serverSessions`` of them, each to a different server and each with
its own reconnect loop, so losing a node loses no registration: a session whose server fails
moves to a server no other session uses. A server with several worker processes says so
in its WELCOME (``worker``, ``workers``: petit_server.workers): the client then keeps a
session to each of its workers, dialling the same address until it holds one per worker (the
kernel picks the worker of each new connection; the hello names the workers held, and one
of those answers with nothing accepted, to be dialled again shortly), so that every worker
serves its registrations without forwarding. Each reconnect loop retries forever with capped
exponential backoff and full jitter, so a fleet of clients does not stampede a server that
comes back. Each stream the server opens is
dialled to its registration's local target (over verified TLS when the target says so)
before it is accepted, so the server can answer 502 at once when the private service is down.
RELOAD re-reads the tenants; when the set of registrations changed, the sessions are replaced
at once, since a session claims its registrations only in its handshake.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import platform
import random
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import trio

from petit import __version__
from petit.auth import (
    MAX_WORKERS,
    Hello,
    decode_window,
    encode_hello,
    hello_transcript,
    parse_json_object,
    sign,
)
from petit.connection import Role, StreamKind, TunnelConnection, split_target
from petit.control import serve_control
from petit.errors import ErrorCode, PetitError, RemoteProtocolError
from petit.httpapi import loopback_json, serve_api
from petit.lockfile import ProcessLock
from petit.logs import set_level
from petit.memory import trim_after_bursts
from petit.pki import client_ssl_context
from petit.session import (
    KeepaliveTimeoutError,
    SessionClosedError,
    Traffic,
    TunnelSession,
    TunnelStream,
    splice,
)
from petit.transport import (
    TUNNEL_PATH,
    ServerAddress,
    ServerUnreachableError,
    open_websocket,
)
from petit.websocket import WebSocket
from petit_client.config import ClientConfig, LocalTarget
from petit_client.selfcheck import CheckResult, check, public_ssl_context
from petit_client.tenants import Tenant, registered_tenants

log = logging.getLogger("petit.client")

STABLE_SESSION = 10.0  # seconds up after which the backoff starts again from the bottom
REDIAL_DELAY = 0.05  # seconds, first delay after reaching a worker already held; doubles
PING_TIMEOUT = 5.0  # seconds a control PING waits for the server's pong
RETRYABLE = (
    ServerUnreachableError,
    RemoteProtocolError,
    KeepaliveTimeoutError,
    trio.BrokenResourceError,
    trio.TooSlowError,
    OSError,
)


class HeldWorkerError(PetitError):
    """The kernel gave this connection to a server worker another session already holds."""


# The original petit's answer to its tunnel check, byte for byte.
TUNNEL_CHECK_ANSWER = (
    b'HTTP/1.1 200 OK\r\nContent-Length: 18\r\nConnection: close\r\n\r\n{"success": true}\n'
)
MAX_CHECK_HEAD = 16 * 1024  # bytes of the check's request head read before answering


async def _answer_tunnel_check(stream: TunnelStream) -> None:
    """``GET /-g2c-intercept``: answered here, so a caller can test the tunnel and this
    client without touching the private service. The request head is read first (bounded
    in size here, in time by the caller), so the answer never races it."""
    stream.accept()
    received = b""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while b"\r\n\r\n" not in received and len(received) < MAX_CHECK_HEAD:
            chunk = await stream.receive_some(MAX_CHECK_HEAD)
            if not chunk:
                break
            received += chunk
        await stream.send_all(TUNNEL_CHECK_ANSWER)


def backoff(max_delay: float, *, first: float = 0.25) -> Iterator[float]:
    """Delays before each reconnection: capped exponential growth with full jitter."""
    ceiling = first
    while True:
        yield random.uniform(first / 2, ceiling)  # noqa: S311 - jitter, not a secret
        ceiling = min(max_delay, ceiling * 2)


def local_ssl_context(local: LocalTarget) -> ssl.SSLContext:
    """TLS towards a local service: verified (system store, or its ``ca``) unless the
    operator turned it off with ``tlsVerify = false`` for a self-signed service.
    """
    if local.tls_verify:
        return client_ssl_context(local.ca)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(slots=True)
class Usage:
    """One registration's streams, as ``status`` reports them."""

    traffic: Traffic  # a_to_b: from the tunnel to the local service (bytes in)
    active_streams: int = 0


@dataclass(slots=True, eq=False)
class _Link:
    """One tunnel session slot: the server it uses now and the state of its session."""

    server: ServerAddress
    # A link added for another worker of its parent's server (None: a configured link).
    parent: _Link | None = None
    workers: int = 1  # a configured link's server: its worker count, as last welcomed
    worker: int | None = None  # the server worker its session is with, if the server has them
    # Set when its server no longer has a worker for it: its loop ends.
    retired: trio.Event = field(default_factory=trio.Event)
    session: TunnelSession | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    reconnect_now: trio.Event = field(default_factory=trio.Event)
    accepted: set[str] = field(default_factory=set)
    state: str = "connecting"
    connected_since: float | None = None
    last_error: str = ""
    last_error_at: float | None = None

    def record_error(self, error: str) -> None:
        """The last error and when it happened ("" clears it: the tunnel is up)."""
        self.last_error = error
        self.last_error_at = time.time() if error else None

    def reconnect(self) -> None:
        """Replace the session at once (the registrations changed)."""
        if self.state == "connected" and self.session is not None:
            self.session.close("the client's registrations changed")
        else:
            self.scope.cancel()
        self.state, self.accepted = "connecting", set()  # no stale "connected" meanwhile
        self.reconnect_now.set()


class ClientService:
    """One running client."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._ssl_context = client_ssl_context(config.ca)
        self._tenants: dict[str, Tenant] = {}
        self._local_contexts: dict[LocalTarget, ssl.SSLContext] = {}
        self._usage: dict[str, Usage] = {}
        servers = config.tunnel_servers
        first = random.randrange(len(servers))  # noqa: S311 - spreads clients over servers
        self._links = [
            _Link(servers[(first + i) % len(servers)]) for i in range(config.session_count)
        ]
        self._link_nursery: trio.Nursery | None = None  # where each link's loop runs, once up
        self._listening = False  # no registration to claim until RELOAD
        self._started = time.time()
        self._reconnects = 0  # dials after the first: after a failure, a drop or a RELOAD
        self._checks: dict[str, CheckResult] = {}  # registration ID -> its last self-check
        self._stop = trio.Event()

    @property
    def _state(self) -> str:
        """connected if any session is; else connecting while any tries; else disconnected."""
        if self._listening:
            return "listening"
        states = {link.state for link in self._links}
        return next(s for s in ("connected", "connecting", "disconnected") if s in states)

    def _connected(self) -> list[_Link]:
        return [link for link in self._links if link.state == "connected"]

    @property
    def _accepted(self) -> set[str]:
        return set().union(*(link.accepted for link in self._connected()))

    @property
    def _last_failure(self) -> _Link | None:
        """The session slot whose error is the most recent, if any has one."""
        failed = [link for link in self._links if link.last_error_at is not None]
        return max(failed, key=lambda link: link.last_error_at or 0, default=None)

    async def handle_control(self, verb: str, args: list[str], actor: str) -> dict[str, object]:
        """The control port's commands: STOP, STATUS, PING, LOG [LEVEL], RELOAD. ``actor``
        says who commanded (logged for STOP)."""
        if verb == "STOP":
            log.info("STOP from %s", actor)
            self._stop.set()
            return {"success": True, "status": "stopping"}
        if verb == "STATUS":
            return self.status()
        if verb == "PING":
            return await self._ping_server()
        if verb == "LOG":
            return set_level(args[0].lower() if args else "debug")
        if verb == "RELOAD":
            return self.reload()
        return {"success": False, "error": f"unknown command {verb}"}

    def status(self) -> dict[str, object]:
        """What the client is doing, as JSON: the control port's STATUS and the status
        endpoint's answer, the client's side of what the server's STATUS shows."""
        connected = self._connected()
        last_failure = self._last_failure
        registrations = [
            {
                "id": rid,
                "tenant": tenant.name,
                "state": self._registration_state(rid),
                "port": registration.port,
                "endpoint": registration.endpoint,
                "local": str(tenant.local),
                "activeStreams": self._usage_of(rid).active_streams,
                "bytesIn": self._usage_of(rid).traffic.a_to_b,
                "bytesOut": self._usage_of(rid).traffic.b_to_a,
                "loopback": None if (last := self._checks.get(rid)) is None else last.to_json(),
            }
            for rid, tenant in self._tenants.items()
            if (registration := tenant.registration) is not None
        ]
        return {
            "success": True,
            "pid": os.getpid(),
            "status": self._state,
            "server": str(connected[0].server if connected else self.config.server),
            "servers": [
                {
                    "server": str(link.server),
                    **({} if link.worker is None else {"worker": link.worker}),
                    "status": link.state,
                    "connectedSince": link.connected_since,
                    "lastError": link.last_error,
                }
                for link in self._links
            ],
            "uptime": round(time.time() - self._started, 1),
            "connectedSince": min(
                (link.connected_since or math.inf for link in connected), default=None
            ),
            "activeStreams": sum(
                link.session.active_streams for link in connected if link.session is not None
            ),
            "bytesIn": sum(usage.traffic.a_to_b for usage in self._usage.values()),
            "bytesOut": sum(usage.traffic.b_to_a for usage in self._usage.values()),
            "reconnects": self._reconnects,
            "lastError": "" if last_failure is None else last_failure.last_error,
            "lastErrorAt": None if last_failure is None else last_failure.last_error_at,
            "registration": registrations,
        }

    def _registration_state(self, registration_id: str) -> str:
        if self._state == "connected" and registration_id not in self._accepted:
            return "disconnected"  # the server did not accept its key (see lastError)
        return self._state

    def _usage_of(self, registration_id: str) -> Usage:
        return self._usage.setdefault(registration_id, Usage(Traffic()))

    async def _ping_server(self) -> dict[str, object]:
        session = next((link.session for link in self._connected()), None)
        if session is None:
            failure = self._last_failure
            reason = "" if failure is None else f": {failure.last_error}"
            return {"success": False, "error": f"Can't ping: the tunnel is {self._state}{reason}"}
        try:
            with trio.fail_after(PING_TIMEOUT):
                seconds = await session.ping_round_trip()
        except trio.TooSlowError:
            return {"success": False, "error": f"Can't ping: no pong within {PING_TIMEOUT:g} s"}
        except SessionClosedError as exc:
            return {"success": False, "error": f"Can't ping: {exc}"}
        return {"success": True, "type": "didPing1", "roundTrip": seconds}

    def reload(self) -> dict[str, object]:
        """Re-read the tenants; replace the session at once if the registrations changed."""
        try:
            tenants = registered_tenants(self.config)
            contexts = self._contexts_for(tenants)
        except PetitError as exc:
            log.error("reload failed, keeping the current tenants: %s", exc)
            return {"success": False, "error": str(exc)}
        changed = tenants.keys() != self._tenants.keys()
        self._tenants, self._local_contexts = tenants, contexts
        if changed:
            log.info("registrations now %s: reconnecting", ", ".join(tenants) or "none")
            self._listening = False
            for link in self._links:
                link.reconnect()
        return {"success": True, "registration": list(tenants), "reconnecting": changed}

    @staticmethod
    def _contexts_for(tenants: dict[str, Tenant]) -> dict[LocalTarget, ssl.SSLContext]:
        tls_targets = {t.local for t in tenants.values() if t.local.tls}
        return {local: local_ssl_context(local) for local in tls_targets}

    async def serve(self, stop: trio.Event, lock: ProcessLock) -> None:
        """Run until ``stop`` is set or STOP arrives."""
        self._stop = stop
        self._tenants = registered_tenants(self.config)
        self._local_contexts = self._contexts_for(self._tenants)
        if not self._tenants:
            raise PetitError(
                f"no registration under {self.config.directory}: "
                f"run petit-client register -c {self.config.path} first"
            )
        async with trio.open_nursery() as nursery:
            control_port = await nursery.start(
                lambda task_status: serve_control(
                    self.handle_control,
                    host=self.config.listen_addr,
                    port=self.config.listen_port,
                    allow=["127.0.0.1", "::1"],
                    task_status=task_status,
                )
            )
            status_port = await self._serve_status(nursery)
            ports = {"control": control_port, "status": status_port}
            lock.write_pid(control_port, ready=True, ports=ports)
            log.info(
                "client %s started for %s; control on %s:%d, status on http://127.0.0.1:%d/status",
                __version__,
                ", ".join(self._tenants),
                self.config.listen_addr,
                control_port,
                status_port,
            )
            self._link_nursery = nursery
            for link in self._links:
                nursery.start_soon(self._keep_connected, link)
            if self.config.loopback_interval:
                nursery.start_soon(self._check_public_urls)
            nursery.start_soon(trim_after_bursts)
            await self._stop.wait()
            nursery.cancel_scope.cancel()
        log.info("stopped")

    async def _check_public_urls(self) -> None:
        """Every loopbackInterval, each carried registration's public URL, end to end
        (``selfcheck``): the result goes to status and, when it changes, to the log."""
        context = public_ssl_context(self.config.ca)
        while True:
            await trio.sleep(self.config.loopback_interval)  # the interval itself
            for rid in sorted(self._accepted):
                registration = self._tenants[rid].registration if rid in self._tenants else None
                if registration is None or not registration.endpoint:
                    continue
                result = await check(registration.endpoint, context)
                before = self._checks.get(rid)
                self._checks[rid] = result
                if result.error:
                    log.warning("loopback check of %s failed: %s", result.url, result.error)
                elif before is None or before.error:
                    log.info("loopback check of %s: ok", result.url)

    async def _serve_status(self, nursery: trio.Nursery) -> int:
        """The status endpoint: GET /status on 127.0.0.1 answers what STATUS does."""
        try:
            port: int = await nursery.start(
                lambda task_status: serve_api(
                    loopback_json({"/status": self.status}),
                    host="127.0.0.1",
                    port=self.config.status_port,
                    task_status=task_status,
                )
            )
        except OSError as exc:
            raise PetitError(
                f"cannot listen for the status endpoint on 127.0.0.1:{self.config.status_port}: "
                f"{exc.strerror or exc}; stop what uses the port or change statusPort"
            ) from None
        return port

    async def _keep_connected(self, link: _Link) -> None:
        delays = backoff(self.config.reconnect_max_delay)
        redials = backoff(self.config.reconnect_max_delay, first=REDIAL_DELAY)
        dialled = held = False
        while not link.retired.is_set():
            link.reconnect_now = trio.Event()
            if not self._tenants:
                self._listening = True  # as the original: nothing to claim until RELOAD
                await link.reconnect_now.wait()
                continue
            if dialled and not held:  # a dial again after a held worker is not a reconnect
                self._reconnects += 1
            dialled = True
            began = trio.current_time()
            failure = ""
            held = False
            with trio.CancelScope() as link.scope:
                try:
                    await self._run_session(link)
                except* HeldWorkerError:
                    held = True
                except* RETRYABLE as group:
                    failure = str(group.exceptions[0])
            if link.reconnect_now.is_set() or trio.current_time() - began > STABLE_SESSION:
                delays = backoff(self.config.reconnect_max_delay)
                redials = backoff(self.config.reconnect_max_delay, first=REDIAL_DELAY)
            link.state, link.worker = "disconnected", None
            link.connected_since = None
            link.accepted = set()
            if link.retired.is_set():
                break
            if held:  # not a failure: the next dial may reach another worker
                link.state = "connecting"
                with trio.move_on_after(next(redials)):  # grows: a worker may be down long
                    await link.reconnect_now.wait()
                continue
            link.record_error(failure or (link.session.close_reason if link.session else ""))
            if link.reconnect_now.is_set():
                continue
            delay = next(delays)
            log.warning(
                "tunnel to %s down (%s); reconnecting in %.1fs", link.server, link.last_error, delay
            )
            if link.parent is None and (server := self._next_server(link)) != link.server:
                link.server = server
                self._fit_family(link, workers=1)  # its workers were the old server's
            with trio.move_on_after(delay):
                await link.reconnect_now.wait()
        self._links.remove(link)

    def _fit_family(self, primary: _Link, workers: int) -> None:
        """A link per worker of ``primary``'s server: added links (each in its loop) up to
        ``workers``, and those past it retired."""
        primary.workers = workers
        family = [m for m in self._links if m.parent is primary and not m.retired.is_set()]
        for link in family[max(0, workers - 1) :]:
            link.retired.set()
            link.reconnect()
        assert self._link_nursery is not None  # links run only once it is up
        for _ in range(workers - 1 - len(family)):
            link = _Link(primary.server, parent=primary)
            self._links.append(link)
            self._link_nursery.start_soon(self._keep_connected, link)

    def _held_workers(self, link: _Link) -> set[int]:
        """The workers of ``link``'s server that its family already has a session to."""
        primary = link.parent or link
        return {
            other.worker
            for other in self._links
            if (other.parent or other) is primary
            and other is not link
            and other.state == "connected"
            and other.worker is not None
        }

    def _next_server(self, link: _Link) -> ServerAddress:
        """After a failure: the next server in the list that no other session uses, if any."""
        servers = self.config.tunnel_servers
        taken = {other.server for other in self._links if other is not link and not other.parent}
        start = servers.index(link.server)
        for step in range(1, len(servers) + 1):
            candidate = servers[(start + step) % len(servers)]
            if candidate not in taken:
                return candidate
        return link.server

    async def _run_session(self, link: _Link) -> None:
        link.state = "connecting"
        deadline = trio.current_time() + self.config.connect_timeout
        with trio.CancelScope(deadline=deadline) as connecting:
            async with open_websocket(
                link.server, self._ssl_context, TUNNEL_PATH, proxy=self.config.proxy
            ) as (websocket, fingerprint):
                connecting.deadline = math.inf  # connected: the session has its own keepalive
                await self._run_handshaken(link, websocket, fingerprint)
        if connecting.cancelled_caught:
            raise trio.TooSlowError(f"no connection to {link.server} within the timeout")

    async def _run_handshaken(self, link: _Link, websocket: WebSocket, fingerprint: bytes) -> None:
        session = TunnelSession(
            TunnelConnection(Role.CLIENT),
            websocket,
            ping_interval=self.config.ping_interval,
            stream_handler=self._handle_stream,
        )
        link.session = session

        def make_hello(nonce: bytes) -> bytes:
            transcript = hello_transcript(nonce, fingerprint, list(self._tenants))
            claims = {rid: sign(t.key(), transcript) for rid, t in self._tenants.items()}
            window = session.connection.offered_window
            held = frozenset(self._held_workers(link))
            return encode_hello(
                Hello(claims=claims, vitae=self._vitae(), window=window, held_workers=held)
            )

        with trio.fail_after(self.config.handshake_timeout):
            welcome = parse_json_object(
                await session.handshake_as_client(make_hello), what="welcome"
            )
        session.connection.settle_windows(decode_window(welcome, what="welcome"))
        rejected = welcome.get("rejected") or []
        link.record_error("")
        if rejected:
            link.record_error(f"the server refused registration(s) {rejected}")
            log.error("the server refused registration(s) %s: their keys do not match", rejected)
        accepted = welcome.get("accepted")
        worker, workers = _worker_place(welcome)
        primary = link.parent or link
        if primary.server == link.server and workers != primary.workers:
            self._fit_family(primary, workers)
        if worker is not None and worker in self._held_workers(link):
            raise HeldWorkerError(f"worker {worker} of {link.server} already has a session")
        link.worker = worker
        link.accepted = {str(rid) for rid in accepted} if isinstance(accepted, list) else set()
        link.state = "connected"
        link.connected_since = time.time()
        log.info("tunnel up to %s for %s", link.server, welcome.get("accepted"))
        await session.serve()

    def _vitae(self) -> dict[str, str]:
        return {
            **self.config.vitae,
            "hostname": platform.node(),
            "platform": platform.system().lower(),
            "arch": platform.machine(),
            "version": __version__,
        }

    async def _handle_stream(self, stream: TunnelStream, target: str) -> None:
        registration_id, kind = split_target(target)
        tenant = self._tenants.get(registration_id)
        if tenant is None:
            stream.refuse(ErrorCode.REFUSED)
            return
        if kind is StreamKind.PROBE:
            with trio.move_on_after(self.config.connect_timeout):
                await _answer_tunnel_check(stream)
            return  # the session closes the stream: the caller reads the answer, then EOF
        local = tenant.local
        if kind is StreamKind.TCP and local.tcp_tls == "passthrough":
            local = dataclasses.replace(local, tls=False)  # the caller's own TLS, if any
        try:
            with trio.fail_after(self.config.connect_timeout):
                backend = await self._dial(local)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError) as exc:
            cause = exc.__cause__ or exc
            log.warning("unable to connect to local %s for %s: %s", local, registration_id, cause)
            stream.refuse(ErrorCode.REFUSED)
            return
        usage = self._usage_of(registration_id)
        usage.active_streams += 1
        log.debug("stream %d for %s spliced to local %s", stream.stream_id, registration_id, local)
        try:
            stream.accept()
            await splice(stream, backend, usage.traffic)
        except trio.BrokenResourceError as exc:
            log.debug("stream %d for %s ended early: %s", stream.stream_id, registration_id, exc)
        finally:
            usage.active_streams -= 1
            await trio.aclose_forcefully(backend)

    async def _dial(self, local: LocalTarget) -> trio.abc.Stream:
        """Connect to a local target; TLS targets are handshaken (and verified) here."""
        tcp = await trio.open_tcp_stream(local.host, local.port)
        if not local.tls:
            return tcp
        tls = trio.SSLStream(
            tcp, self._local_contexts[local], server_hostname=local.host, https_compatible=True
        )
        try:
            await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        return tls


def _worker_place(welcome: dict[str, object]) -> tuple[int | None, int]:
    """(this worker's index, the server's worker count) from a WELCOME; (None, 1) from a
    server without workers. A count past ``MAX_WORKERS`` is held to it."""
    worker, workers = welcome.get("worker"), welcome.get("workers")
    if type(worker) is not int or type(workers) is not int or not 0 <= worker < workers:
        return None, 1  # absent, or not numbers as JSON has them (true is no index)
    return worker, min(workers, MAX_WORKERS)
