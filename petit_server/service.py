"""The server process: tunnel endpoint, HTTP ingress and control port in one nursery.

Shutdown (STOP, SIGINT, SIGTERM) is graceful and bounded: stop accepting, send GOAWAY on
every tunnel so clients reconnect once we are back, give in-flight requests
``shutdown_grace`` seconds, then cancel what is left.
"""

from __future__ import annotations

import logging
from functools import partial

import trio
from trio_websocket import serve_websocket

from petit import __version__
from petit.auth import key_fingerprint
from petit.control import serve_control
from petit.lockfile import ProcessLock
from petit.pki import certificate_fingerprint, pem_to_der, server_ssl_context
from petit.transport import MAX_MESSAGE, RECEIVE_BUFFER
from petit_server.config import ServerConfig
from petit_server.gateway import Gateway
from petit_server.hub import Hub
from petit_server.ingress import Routing, serve_ingress
from petit_server.registry import FileRegistry

log = logging.getLogger("petit.server")


class ServerService:
    """One running server: its registry, its live sessions and its listeners."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.registry = FileRegistry(config.registry_file, first_port=config.first_port)
        self.hub = Hub()
        self._stop = trio.Event()

    async def handle_control(self, verb: str, args: list[str]) -> dict[str, object]:
        """The control port's commands: STOP, STATUS [ID], PING."""
        if verb == "STOP":
            self._stop.set()
            return {"success": True, "status": "stopping"}
        if verb == "PING":
            return {"success": True, "type": "didPing1", "version": __version__}
        if verb == "STATUS" and not args:
            return {"success": True, "status": "running", "connections": self._connections()}
        if verb == "STATUS" and len(args) == 1:
            return self._status_of(args[0])
        return {"success": False, "error": f"unknown command {verb}"}

    def _connections(self) -> list[dict[str, object]]:
        return [
            {"registeredId": r.registration_id, "connected": self.hub.is_online(r.registration_id)}
            for r in self.registry.all()
        ]

    def _status_of(self, registration_id: str) -> dict[str, object]:
        registration = self.registry.get(registration_id)
        if registration is None:
            return {"success": False, "error": f"No such registeredId {registration_id}."}
        sessions = [
            {
                "remote": a.remote,
                "since": a.since,
                "vitae": a.vitae,
                "streams": a.session.active_streams,
            }
            for a in self.hub.attachments()
            if registration_id in a.registration_ids
        ]
        return {
            "success": True,
            "status": "running",
            "connections": [
                {
                    "registeredId": registration_id,
                    "port": registration.port,
                    "fingerprint": key_fingerprint(registration.public_key),
                    "connected": bool(sessions),
                    "aliases": registration.aliases,
                    "sessions": sessions,
                }
            ],
        }

    async def serve(self, stop: trio.Event, lock: ProcessLock) -> None:
        """Run until ``stop`` is set (or STOP arrives), then shut down gracefully."""
        config = self.config
        self._stop = stop
        ssl_context = server_ssl_context(config.certificate, config.key)
        fingerprint = certificate_fingerprint(pem_to_der(config.certificate.read_bytes()))
        gateway = Gateway(config, self.registry, self.hub, fingerprint)
        routing = Routing(
            is_registered=lambda rid: self.registry.get(rid) is not None,
            session_for=self.hub.session_for,
            open_timeout=config.open_timeout,
            header_timeout=config.header_timeout,
        )
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as listeners:
                websocket_server = await listeners.start(
                    partial(
                        serve_websocket,
                        gateway.handle,
                        config.bind_addr,
                        config.back_port,
                        ssl_context,
                        handler_nursery=handlers,
                        max_message_size=MAX_MESSAGE,
                        receive_buffer_size=RECEIVE_BUFFER,
                    )
                )
                http_port = await listeners.start(
                    partial(
                        serve_ingress,
                        routing,
                        host=config.bind_addr,
                        port=config.proxy_port,
                        handler_nursery=handlers,
                    )
                )
                control_port = await listeners.start(
                    partial(
                        serve_control,
                        self.handle_control,
                        host=config.listen_addr,
                        port=config.listen_port,
                        allow=config.listen_allow,
                    )
                )
                tunnel_port = websocket_server.port
                lock.write_pid(
                    control_port,
                    ready=True,
                    ports={"tunnel": tunnel_port, "http": http_port, "control": control_port},
                )
                log.info(
                    "server %s ready: tunnel wss://%s:%d/petit/v1, HTTP ingress %s:%d, "
                    "control %s:%d",
                    __version__,
                    config.bind_addr,
                    tunnel_port,
                    config.bind_addr,
                    http_port,
                    config.listen_addr,
                    control_port,
                )
                await self._stop.wait()
                listeners.cancel_scope.cancel()
            await self._drain(handlers)

    async def _drain(self, handlers: trio.Nursery) -> None:
        log.info("stopping: draining %d in-flight stream(s)", self.hub.active_streams)
        self.hub.go_away_all("server shutting down")
        with trio.move_on_after(self.config.shutdown_grace):
            await self.hub.wait_idle()
        handlers.cancel_scope.cancel()
        log.info("stopped")
