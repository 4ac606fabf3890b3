"""The server process: tunnel endpoint, HTTP(S) ingress, raw TCP ports and control port in one
nursery.

Shutdown (STOP, SIGINT, SIGTERM) is graceful and bounded: stop accepting, send GOAWAY on
every tunnel so clients reconnect once we are back, give in-flight requests
``shutdown_grace`` seconds, then cancel what is left.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

from petit import __version__
from petit.control import parse_networks, serve_control
from petit.errors import PetitError
from petit.httpapi import serve_api
from petit.listen import show_address
from petit.lockfile import ProcessLock
from petit.logs import set_level
from petit.memory import trim_after_bursts
from petit.pki import certificate_fingerprint, pem_to_der, server_ssl_context
from petit.statefile import remove_stale_temporaries
from petit.websocket import serve_websocket
from petit_server.config import ServerConfig
from petit_server.edge.cluster import Cluster
from petit_server.edge.gateway import Gateway, SourceRate
from petit_server.edge.https import ReloadingContext, certificate_source, serve_https
from petit_server.edge.hub import Attachment, Hub, Upstreams
from petit_server.edge.ingress import ConnectionLimits, Routing, serve_ingress
from petit_server.edge.tcpports import TcpPorts
from petit_server.ops.admin import AdminApi, AdminSources
from petit_server.policy import Policy
from petit_server.registry.backend import open_registry
from petit_server.registry.base import Registration, Registry, apply_command
from petit_server.usage import UsageStore

log = logging.getLogger("petit.server")


class ServerService:
    """One running server: its registry, its live sessions and its listeners. In a worker
    (``petit_server.workers``), one of several: its public ports are shared with the others,
    ``on_ready`` tells the supervisor its ports, and only worker 0 serves the admin API."""

    def __init__(
        self, config: ServerConfig, on_ready: Callable[[dict[str, int]], None] | None = None
    ) -> None:
        self.config = config
        self._on_ready = on_ready
        self.registry = check_registry(config)
        self.usage = UsageStore()
        self.hub = Hub(
            on_forget=self.usage.forget,
            max_streams_per_registration=config.max_streams_per_registration,
            policy_of=lambda rid: self.policy_of(rid),  # late-bound: serve() reloads it
        )
        self.cluster = (
            None
            if config.cluster is None
            else Cluster(
                config.cluster,
                self.hub,
                # One prefix for all petit keeps in Redis; workers keep their own directory.
                key_prefix=config.cluster.key_prefix or config.registry_prefix,
                ping_interval=config.ping_interval,
                open_timeout=config.open_timeout,
                handshake_timeout=config.handshake_timeout,
            )
        )
        self.upstreams: Upstreams = self.hub if self.cluster is None else self.cluster
        self.public_limits = ConnectionLimits(
            total=config.max_connections, per_address=config.max_connections_per_address
        )
        self.tcp_ports = TcpPorts(
            self.upstreams,
            lambda rid: self.registry.get(rid),  # late-bound: serve() reloads the registry
            host=config.tcp_addr,
            open_timeout=config.open_timeout,
            usage=self.usage,
            policy_of=self.policy_of,
            limits=self.public_limits,
            shared=config.worker is not None,
        )
        self._stop = trio.Event()

    def policy_of(self, registration_id: str) -> Policy:
        """The policy a registration's requests meet: its own keys over [server.policy]."""
        registration = self.registry.get(registration_id)
        defaults = self.config.default_policy
        if registration is None:
            return defaults
        # Per request (and per stream): merge only when there are defaults to merge.
        return registration.policy.over(defaults) if defaults else registration.policy

    async def handle_control(self, verb: str, args: list[str], actor: str) -> dict[str, object]:
        """The control port's commands (``answer_control``), with this server's STATUS."""

        async def status(registration_id: str | None) -> dict[str, object]:
            return self.status(registration_id)

        async def set_log_level(level: str) -> dict[str, object]:
            return set_level(level)

        return await answer_control(
            verb, args, actor, self._stop, self.registry, status, set_log_level
        )

    def status(self, registration_id: str | None) -> dict[str, object]:
        """Every registration in brief, or one with its vitae and sessions."""
        sessions: dict[str, list[Attachment]] = {}
        for attachment in self.hub.attachments():
            for rid in attachment.registration_ids:
                sessions.setdefault(rid, []).append(attachment)
        if registration_id is None:
            connections = [
                self._summary(r, sessions.get(r.registration_id, [])) for r in self.registry.all()
            ]
            cluster = {} if self.cluster is None else {"cluster": self.cluster.status()}
            return {
                "success": True,
                "status": "running",
                "tasks": _task_count(),
                "publicConnections": self.public_limits.open,
                "connections": connections,
                **cluster,
            }
        registration = self.registry.get(registration_id)
        if registration is None:
            return {"success": False, "error": f"No such registeredId {registration_id}."}
        serving = sessions.get(registration_id, [])
        detail = {
            **self._summary(registration, serving),
            "vitae": registration.vitae,
            "sessions": [
                {
                    "remote": a.remote,
                    "since": a.since,
                    "vitae": a.vitae,
                    "streams": a.session.active_streams,
                }
                for a in serving
            ],
        }
        return {"success": True, "status": "running", "connections": [detail]}

    def _summary(self, registration: Registration, serving: list[Attachment]) -> dict[str, object]:
        return {
            "registeredId": registration.registration_id,
            "connected": self.hub.is_online(registration.registration_id),
            "port": registration.port,
            "fingerprint": registration.fingerprint,
            "aliases": registration.aliases,
            "policy": registration.policy.to_json(),
            "since": min((a.since for a in serving), default=None),
            "remotes": sorted({a.remote for a in serving}),
            **self.tcp_ports.status_of(registration.registration_id),
        }

    async def serve(self, stop: trio.Event, lock: ProcessLock) -> None:
        """Run until ``stop`` is set (or STOP arrives), then shut down gracefully."""
        config = self.config
        self._stop = stop
        # Read again now that we hold the lock: an offline edit may have landed since __init__.
        # (Redis: read by the registry's run task, in a worker thread, below.) With the lock
        # held no writer runs, so temporaries a killed server left are partial copies: gone.
        if config.registry_backend == "file":
            remove_stale_temporaries(config.registry_file)
        self.registry = open_registry(config, load=False, on_removed=self.hub.forget)
        ssl_context = server_ssl_context(config.certificate, config.key)
        fingerprint = certificate_fingerprint(pem_to_der(config.certificate.read_bytes()))
        https_source = certificate_source(config)
        https_context = None if https_source is None else ReloadingContext(https_source)
        gateway = Gateway(
            config,
            self.registry,
            self.hub,
            fingerprint,
            SourceRate(config.registrations_per_minute),
        )
        routing = Routing(
            route=self.registry.route,
            open_upstream=self.upstreams.open_stream,
            open_timeout=config.open_timeout,
            header_timeout=config.header_timeout,
            response_timeout=config.response_timeout,
            idle_timeout=config.idle_timeout,
            usage=self.usage,
            limits=self.public_limits,
            policy_of=self.policy_of,
            trusted_proxies=tuple(parse_networks(config.trusted_proxies, "trustedProxies")),
            proxy_protocol=config.proxy_protocol,
        )
        public = config.bind_addr
        shared = config.worker is not None  # the public ports are every worker's
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as listeners:
                await listeners.start(self.registry.run)
                # In handlers: cancelled after the drain, it adds the last requests' usage.
                handlers.start_soon(self.registry.share_usage, self.usage)
                handlers.start_soon(trim_after_bursts)
                tunnel = partial(
                    serve_websocket,
                    gateway.handle,
                    ssl_context=ssl_context,
                    handler_nursery=handlers,
                    # From TCP accept through TLS and the WebSocket upgrade; the hello then
                    # has its own handshakeTimeout (gateway).
                    handshake_timeout=config.handshake_timeout,
                    shared=shared,
                )
                ports: dict[str, int] = {
                    "tunnel": await start_listener(
                        listeners, "tunnel endpoint", "backPort", public, config.back_port, tunnel
                    )
                }
                if https_context is not None:
                    https = partial(
                        serve_https,
                        routing,
                        https_context,
                        handshake_timeout=config.handshake_timeout,
                        handler_nursery=handlers,
                        shared=shared,
                    )
                    ports["https"] = await start_listener(
                        listeners,
                        "HTTPS ingress",
                        "secureProxyPort",
                        public,
                        config.secure_proxy_port,
                        https,
                    )
                http = partial(
                    serve_ingress,
                    routing,
                    handler_nursery=handlers,
                    redirect_to_port=ports.get("https") if config.https_redirect else None,
                    shared=shared,
                )
                ports["http"] = await start_listener(
                    listeners, "HTTP ingress", "proxyPort", public, config.proxy_port, http
                )
                control = partial(serve_control, self.handle_control, allow=config.listen_allow)
                ports["control"] = await start_listener(
                    listeners,
                    "control port",
                    "listenPort",
                    config.listen_addr,
                    config.listen_port,
                    control,
                )
                if self.cluster is not None:
                    ports["cluster"] = await self._join_cluster(
                        self.cluster, listeners, handlers, ssl_context, fingerprint
                    )
                first_worker = config.worker is None or config.worker.index == 0
                if config.admin_token is not None and first_worker:  # worker 0 serves it
                    api = self._admin_api(config.admin_token)
                    admin = partial(serve_api, api.answer, handler_nursery=handlers)
                    ports["admin"] = await start_listener(
                        listeners,
                        "admin API",
                        "adminPort",
                        config.admin_addr,
                        config.admin_port,
                        admin,
                    )
                else:
                    log.warning("admin API off: set adminToken in [server] to turn it on")
                await listeners.start(self.tcp_ports.run, handlers)
                lock.write_pid(ports["control"], ready=True, ports=ports)
                if self._on_ready is not None:
                    self._on_ready(ports)
                log.info("server %s ready: %s", __version__, _describe(config, ports))
                await self._stop.wait()
                listeners.cancel_scope.cancel()
            await self._drain(handlers)
        self.registry.close()

    def _admin_api(self, token: str) -> AdminApi:
        sources = AdminSources(
            registry=self.registry,
            hub=self.hub,
            usage=self.usage,
            status=self.status,
            registry_command=partial(apply_command, self.registry),
            started=time.time(),
        )
        return AdminApi(token, sources)

    async def _join_cluster(
        self,
        cluster: Cluster,
        listeners: trio.Nursery,
        handlers: trio.Nursery,
        ssl_context: ssl.SSLContext,
        fingerprint: bytes,
    ) -> int:
        """Listen for the other nodes' links, then start the heartbeat, which advertises the
        bound port. Links and heartbeat run in ``handlers``: forwarded streams drain on stop."""
        links = partial(
            cluster.serve_links,
            ssl_context=ssl_context,
            fingerprint=fingerprint,
            handler_nursery=handlers,
        )
        internal = cluster.config
        port: int = await start_listener(
            listeners,
            "cluster link port",
            "cluster.internalPort",
            internal.internal_addr,
            internal.internal_port,
            links,
        )
        await handlers.start(cluster.run)
        return port

    async def _drain(self, handlers: trio.Nursery) -> None:
        log.info("stopping: draining %d in-flight stream(s)", self.hub.active_streams)
        self.hub.go_away_all("server shutting down")
        with trio.move_on_after(self.config.shutdown_grace):
            if self.cluster is not None:
                await self.cluster.leave()
                await self.cluster.wait_idle()
            await self.hub.wait_idle()
        handlers.cancel_scope.cancel()
        log.info("stopped")


async def answer_control(
    verb: str,
    args: list[str],
    actor: str,
    stop: trio.Event,
    registry: Registry,
    status: Callable[[str | None], Awaitable[dict[str, object]]],
    set_log_level: Callable[[str], Awaitable[dict[str, object]]],
) -> dict[str, object]:
    """The control port's commands, as a server and the workers' supervisor both answer
    them: STOP, PING, STATUS [ID], LOG [LEVEL], the registry commands (ADDALIAS, DELALIAS,
    TOKEN ...) that ``petit-server`` sends while the server runs. ``actor`` (who commanded)
    goes to the log and the audit trail."""
    if verb == "STOP":
        log.info("STOP from %s", actor)
        stop.set()
        return {"success": True, "status": "stopping"}
    if verb == "PING":
        return {"success": True, "type": "didPing1", "version": __version__}
    if verb == "STATUS" and len(args) <= 1:
        return await status(args[0] if args else None)
    if verb == "LOG":
        return await set_log_level(args[0].lower() if args else "debug")
    reply = await apply_command(registry, verb, args, actor=actor)
    if reply is None:
        return {"success": False, "error": f"unknown command {verb}"}
    return reply


def check_registry(config: ServerConfig) -> Registry:
    """The registry read once and closed: a bad or unreachable one is a one-line error here,
    before ``start`` backgrounds the daemon, which opens it again to serve."""
    registry = open_registry(config)
    registry.close()
    return registry


def _task_count() -> int:
    """The trio tasks alive in this process: a count that keeps growing is a leak."""
    root = trio.lowlevel.current_root_task()
    tasks = [] if root is None else [root]
    for task in tasks:  # grows as it goes: a breadth-first walk of the task tree
        tasks.extend(child for nursery in task.child_nurseries for child in nursery.child_tasks)
    return len(tasks)


def _describe(config: ServerConfig, ports: dict[str, int]) -> str:
    """Where each listener is, for the ready log line."""
    public = config.bind_addr
    parts = [f"tunnel endpoint {show_address(public, ports['tunnel'])} (/petit/v1)"]
    redirect = " (redirects to HTTPS)" if config.https_redirect else ""
    parts.append(f"HTTP ingress {show_address(public, ports['http'])}{redirect}")
    if "https" in ports:
        parts.append(f"HTTPS ingress {show_address(public, ports['https'])}")
    parts.append(f"TCP ports on {config.tcp_addr}")
    parts.append(f"control {show_address(config.listen_addr, ports['control'])}")
    if "admin" in ports:
        parts.append(f"admin API {show_address(config.admin_addr, ports['admin'])} (/dashboard)")
    if config.cluster is not None:
        node = config.cluster
        parts.append(f"cluster node {node.node_id} links {node.internal_addr}:{ports['cluster']}")
    return ", ".join(parts)


async def start_listener(
    listeners: trio.Nursery,
    what: str,
    key: str,
    host: str,
    port: int,
    serve: Callable[..., Awaitable[object]],
) -> Any:
    """Start one listener and return what it reports; a port it cannot bind is one error line."""
    try:
        return await listeners.start(partial(serve, host=host, port=port))
    except OSError as exc:
        raise cannot_listen(what, key, host, port, exc) from None


def cannot_listen(what: str, key: str, host: str, port: int, exc: OSError) -> PetitError:
    """The one line a port that cannot be bound ends the start with."""
    return PetitError(
        f"cannot listen for the {what} on {host}:{port}: {exc.strerror or exc}; "
        f"stop what uses the port or change {key}"
    )
