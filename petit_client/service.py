"""The client process: keep one tunnel session up and splice its streams to local services.

The reconnect loop retries forever with capped exponential backoff and full jitter, so a
fleet of clients does not stampede a server that comes back. Each stream the server opens is
dialled to its registration's local target before it is accepted, so the server can answer
502 at once when the private service is down.
"""

from __future__ import annotations

import logging
import math
import platform
import random
import time
from collections.abc import Iterator

import trio
from trio_websocket import WebSocketConnection

from petit import __version__
from petit.auth import Hello, encode_hello, hello_transcript, parse_json_object, sign
from petit.connection import Role, TunnelConnection
from petit.control import serve_control
from petit.errors import ErrorCode, PetitError, RemoteProtocolError
from petit.lockfile import ProcessLock
from petit.pki import client_ssl_context
from petit.session import KeepaliveTimeoutError, TunnelSession, TunnelStream, splice
from petit.transport import (
    TUNNEL_PATH,
    ServerUnreachableError,
    WebSocketCarrier,
    open_websocket,
)
from petit_client.config import ClientConfig
from petit_client.tenants import Tenant, registered_tenants

log = logging.getLogger("petit.client")

STABLE_SESSION = 10.0  # seconds up after which the backoff starts again from the bottom
RETRYABLE = (
    ServerUnreachableError,
    RemoteProtocolError,
    KeepaliveTimeoutError,
    trio.BrokenResourceError,
    trio.TooSlowError,
    OSError,
)


def backoff(max_delay: float, *, first: float = 0.25) -> Iterator[float]:
    """Delays before each reconnection: capped exponential growth with full jitter."""
    ceiling = first
    while True:
        yield random.uniform(first / 2, ceiling)  # noqa: S311 - jitter, not a secret
        ceiling = min(max_delay, ceiling * 2)


class ClientService:
    """One running client."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._ssl_context = client_ssl_context(config.ca)
        self._tenants: dict[str, Tenant] = {}
        self._session: TunnelSession | None = None
        self._state = "connecting"
        self._connected_since: float | None = None
        self._started = time.time()
        self._last_error = ""
        self._stop = trio.Event()

    async def handle_control(self, verb: str, args: list[str]) -> dict[str, object]:
        """The control port's commands: STOP, STATUS, PING."""
        if verb == "STOP":
            self._stop.set()
            return {"success": True, "status": "stopping"}
        if verb == "STATUS":
            return self.status()
        if verb == "PING":
            return {"success": True, "type": "didPing1", "connected": self._state == "connected"}
        return {"success": False, "error": f"unknown command {verb}"}

    def status(self) -> dict[str, object]:
        """What the client is doing, as JSON."""
        session = self._session
        return {
            "success": True,
            "status": self._state,
            "server": str(self.config.server),
            "uptime": round(time.time() - self._started, 1),
            "connectedSince": self._connected_since,
            "activeStreams": 0 if session is None else session.active_streams,
            "lastError": self._last_error,
            "registration": [
                {
                    "id": t.registration_id,
                    "port": t.port,
                    "endpoint": t.endpoint,
                    "local": str(t.local),
                    "tenant": t.name,
                }
                for t in self._tenants.values()
            ],
        }

    async def serve(self, stop: trio.Event, lock: ProcessLock) -> None:
        """Run until ``stop`` is set or STOP arrives."""
        self._stop = stop
        self._tenants = {t.registration_id: t for t in registered_tenants(self.config)}
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
            lock.write_pid(control_port, ready=True, ports={"control": control_port})
            log.info(
                "client %s started for %s; control on %s:%d",
                __version__,
                ", ".join(self._tenants),
                self.config.listen_addr,
                control_port,
            )
            nursery.start_soon(self._keep_connected)
            await self._stop.wait()
            nursery.cancel_scope.cancel()
        log.info("stopped")

    async def _keep_connected(self) -> None:
        delays = backoff(self.config.reconnect_max_delay)
        while True:
            began = trio.current_time()
            failure = ""
            try:
                await self._run_session()
            except* RETRYABLE as group:
                failure = str(group.exceptions[0])
            if trio.current_time() - began > STABLE_SESSION:
                delays = backoff(self.config.reconnect_max_delay)
            self._state = "disconnected"
            self._connected_since = None
            self._last_error = failure or (self._session.close_reason if self._session else "")
            delay = next(delays)
            log.warning("tunnel down (%s); reconnecting in %.1fs", self._last_error, delay)
            await trio.sleep(delay)

    async def _run_session(self) -> None:
        self._state = "connecting"
        deadline = trio.current_time() + self.config.connect_timeout
        with trio.CancelScope(deadline=deadline) as connecting:
            async with open_websocket(self.config.server, self._ssl_context, TUNNEL_PATH) as (
                websocket,
                fingerprint,
            ):
                connecting.deadline = math.inf  # connected: the session has its own keepalive
                await self._run_handshaken(websocket, fingerprint)
        if connecting.cancelled_caught:
            raise trio.TooSlowError(f"no connection to {self.config.server} within the timeout")

    async def _run_handshaken(self, websocket: WebSocketConnection, fingerprint: bytes) -> None:
        session = TunnelSession(
            TunnelConnection(Role.CLIENT),
            WebSocketCarrier(websocket),
            ping_interval=self.config.ping_interval,
            stream_handler=self._handle_stream,
        )
        self._session = session

        def make_hello(nonce: bytes) -> bytes:
            transcript = hello_transcript(nonce, fingerprint, list(self._tenants))
            claims = {rid: sign(t.key(), transcript) for rid, t in self._tenants.items()}
            return encode_hello(Hello(claims=claims, vitae=self._vitae()))

        with trio.fail_after(self.config.handshake_timeout):
            welcome = parse_json_object(
                await session.handshake_as_client(make_hello), what="welcome"
            )
        rejected = welcome.get("rejected") or []
        if rejected:
            log.error("the server refused registration(s) %s: their keys do not match", rejected)
        self._state = "connected"
        self._connected_since = time.time()
        self._last_error = ""
        log.info("tunnel up to %s for %s", self.config.server, welcome.get("accepted"))
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
        tenant = self._tenants.get(target)
        if tenant is None:
            stream.refuse(ErrorCode.REFUSED)
            return
        local = tenant.local
        try:
            with trio.fail_after(self.config.connect_timeout):
                backend: trio.abc.HalfCloseableStream = await trio.open_tcp_stream(
                    local.host, local.port
                )
        except (OSError, trio.TooSlowError) as exc:
            log.warning("unable to connect to local %s for %s: %s", local, target, exc)
            stream.refuse(ErrorCode.REFUSED)
            return
        try:
            stream.accept()
            await splice(stream, backend)
        except trio.BrokenResourceError as exc:
            log.debug("stream %d for %s ended early: %s", stream.stream_id, target, exc)
        finally:
            await trio.aclose_forcefully(backend)
