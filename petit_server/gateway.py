"""The tunnel endpoint: WebSocket requests for tunnels and for registration.

Nothing is marked connected before the hello's signatures verify; an ID is routed only to a
session that proved that ID's own key, so no other key can ever take it over.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
from dataclasses import dataclass

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from petit import messages
from petit.auth import (
    NONCE_SIZE,
    accepted_ids,
    b64decode,
    decode_hello,
    decode_vitae,
    register_transcript,
    verify,
)
from petit.connection import Role, TunnelConnection
from petit.errors import AuthError, PetitError, RemoteProtocolError
from petit.session import KeepaliveTimeoutError, TunnelSession
from petit.transport import REGISTER_PATH, TUNNEL_PATH, WebSocketCarrier
from petit_server.config import ServerConfig
from petit_server.hub import Attachment, Hub
from petit_server.registry import FileRegistry

log = logging.getLogger("petit.gateway")


@dataclass(frozen=True, slots=True)
class Gateway:
    """What the WebSocket handler needs, bound once at start."""

    config: ServerConfig
    registry: FileRegistry
    hub: Hub
    certificate_fingerprint: bytes

    async def handle(self, request: WebSocketRequest) -> None:
        """Dispatch one WebSocket request by path."""
        remote = _remote(request)
        if request.path == TUNNEL_PATH:
            await self._serve_tunnel(await request.accept(), remote)
        elif request.path == REGISTER_PATH:
            await self._serve_registration(await request.accept(), remote)
        else:
            await request.reject(404)

    async def _serve_tunnel(self, websocket: WebSocketConnection, remote: str) -> None:
        session = TunnelSession(
            TunnelConnection(Role.SERVER),
            WebSocketCarrier(websocket),
            ping_interval=self.config.ping_interval,
        )
        nonce = secrets.token_bytes(NONCE_SIZE)
        proven: list[str] = []
        vitae: dict[str, str] = {}

        def check_hello(payload: bytes) -> bytes:
            hello = decode_hello(payload)
            ids = accepted_ids(
                hello, nonce, self.certificate_fingerprint, self.registry.public_key_of
            )
            if not ids:
                raise AuthError("no claimed registration could be verified with its key")
            proven.extend(ids)
            vitae.update(hello.vitae, ip=remote)
            rejected = sorted(set(hello.claims) - set(ids))
            welcome = {
                "accepted": ids,
                "rejected": rejected,
                "endpoints": {rid: self.config.endpoint_for(rid) for rid in ids},
                "vitae": self.config.vitae,
            }
            return json.dumps(welcome).encode()

        try:
            with trio.fail_after(self.config.handshake_timeout):
                await session.handshake_as_server(nonce, check_hello)
        except (PetitError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            log.info("tunnel from %s refused: %s", remote, str(exc) or "handshake timeout")
            return
        attachment = Attachment(session, proven, remote, vitae)
        self.hub.attach(attachment)
        log.info("tunnel from %s serves %s", remote, ", ".join(proven))
        try:
            await session.serve()
        except (RemoteProtocolError, KeepaliveTimeoutError, trio.BrokenResourceError) as exc:
            log.info("tunnel from %s for %s ended: %s", remote, ", ".join(proven), exc)
        else:
            log.info(
                "tunnel from %s for %s closed: %s", remote, ", ".join(proven), session.close_reason
            )
        finally:
            self.hub.detach(attachment)

    async def _serve_registration(self, websocket: WebSocketConnection, remote: str) -> None:
        nonce = secrets.token_bytes(NONCE_SIZE)
        try:
            with trio.fail_after(self.config.handshake_timeout):
                await websocket.send_message(
                    messages.encode({"nonce": base64.b64encode(nonce).decode()})
                )
                request = messages.decode(await websocket.get_message(), what="registration")
                reply = self._register(request, nonce, remote)
                await websocket.send_message(messages.encode(reply))
        except (ConnectionClosed, trio.TooSlowError, trio.BrokenResourceError) as exc:
            log.info("registration from %s abandoned: %s", remote, str(exc) or "timeout")

    def _register(self, request: dict[str, object], nonce: bytes, remote: str) -> dict[str, object]:
        try:
            public_key = _field_bytes(request, "public_key")
            signature = _field_bytes(request, "signature")
            vitae = decode_vitae(request.get("vitae", {}))
            if len(public_key) != 32:
                raise RemoteProtocolError("public_key must be a 32-byte Ed25519 key")
            transcript = register_transcript(nonce, self.certificate_fingerprint, public_key)
            if not verify(public_key, signature, transcript):
                raise AuthError("the registration is not signed by the key it registers")
        except PetitError as exc:
            log.info("registration from %s refused: %s", remote, exc)
            return {"type": "error", "error": str(exc)}
        registration = self.registry.register(public_key, vitae)
        rid = registration.registration_id
        log.info("registered %s (port %d) from %s", rid, registration.port, remote)
        return {
            "type": "registered",
            "id": rid,
            "port": registration.port,
            "endpoint": self.config.endpoint_for(rid),
        }


def _field_bytes(request: dict[str, object], key: str) -> bytes:
    value = request.get(key)
    if not isinstance(value, str):
        raise RemoteProtocolError(f"registration: '{key}' is required")
    return b64decode(value, what=key)


def _remote(request: WebSocketRequest) -> str:
    remote = request.remote
    return str(getattr(remote, "address", remote))
