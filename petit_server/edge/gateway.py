"""The tunnel endpoint: WebSocket requests for tunnels, registration and unregistration.

Nothing is marked connected before the hello's signatures verify; an ID is routed only to a
session that proved that ID's own key, so no other key can ever take it over, and only that
key can unregister it.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from petit import messages
from petit.auth import (
    NOBODY_KEY,
    NONCE_SIZE,
    accepted_ids,
    b64decode,
    decode_hello,
    decode_vitae,
    register_transcript,
    unregister_transcript,
    verify,
)
from petit.connection import SERVER_WINDOW, Role, TunnelConnection
from petit.errors import AuthError, PetitError, RemoteProtocolError
from petit.logs import Throttled
from petit.session import KeepaliveTimeoutError, TunnelSession
from petit.transport import REGISTER_PATH, TUNNEL_PATH, UNREGISTER_PATH
from petit.websocket import UpgradeRequest, WebSocket
from petit_server.config import ServerConfig
from petit_server.edge.hub import Attachment, Hub
from petit_server.edge.rates import TokenBuckets
from petit_server.registry.base import Registry, RegistryUnavailableError, token_to_present

log = logging.getLogger("petit.gateway")


class RegistrationRateError(PetitError):
    """One source address asked for too many registrations too quickly."""


@dataclass(slots=True)
class SourceRate:
    """At most ``per_minute`` registrations per source address (a token bucket each, full
    at first; at most ``max_sources`` addresses are remembered)."""

    per_minute: int
    max_sources: int = 65_536
    _buckets: TokenBuckets = field(init=False)

    def __post_init__(self) -> None:
        self._buckets = TokenBuckets(self.max_sources)

    def seconds_to_wait(self, address: str, now: float) -> float:
        """0 and one registration counted, or how long ``address`` must wait for its next."""
        return self._buckets.seconds_to_wait(
            address, now, rate=self.per_minute / 60, burst=self.per_minute
        )


@dataclass(frozen=True, slots=True)
class Gateway:
    """What the WebSocket handler needs, bound once at start."""

    config: ServerConfig
    registry: Registry
    hub: Hub
    certificate_fingerprint: bytes
    registrations: SourceRate
    # Refusals a peer can repeat at will: one log line per peer and kind per interval.
    reports: Throttled = field(default_factory=lambda: Throttled(log))

    async def handle(self, request: UpgradeRequest) -> None:
        """Dispatch one WebSocket request by path."""
        remote = request.remote
        if request.path == TUNNEL_PATH:
            await self._serve_tunnel(await request.accept(), remote)
        elif request.path == REGISTER_PATH:
            await self._exchange(await request.accept(), remote, "register", self._register)
        elif request.path == UNREGISTER_PATH:
            await self._exchange(await request.accept(), remote, "unregister", self._unregister)
        else:
            await request.reject(404)

    async def _serve_tunnel(self, websocket: WebSocket, remote: str) -> None:
        session = TunnelSession(
            TunnelConnection(Role.SERVER, offered_window=SERVER_WINDOW),
            websocket,
            ping_interval=self.config.ping_interval,
        )
        nonce = secrets.token_bytes(NONCE_SIZE)
        proven: list[str] = []
        vitae: dict[str, str] = {}

        worker = self.config.worker  # None: a single server, not one of several workers
        place = {} if worker is None else {"worker": worker.index, "workers": worker.count}

        async def check_hello(payload: bytes) -> bytes:
            hello = decode_hello(payload)
            if worker is not None and worker.index in hello.held_workers:
                # The client has a session to this worker: it dials again, and this session
                # ends unattached, so no visitor is ever routed to it.
                return json.dumps({"accepted": [], "rejected": [], **place}).encode()
            await self.registry.catch_up(sorted(hello.claims))
            ids = accepted_ids(
                hello, nonce, self.certificate_fingerprint, self.registry.public_key_of
            )
            if not ids:
                raise AuthError("no claimed registration could be verified with its key")
            if hello.window is None:  # it would send 1 MiB per stream: past our memory bound
                raise RemoteProtocolError(
                    "the hello announces no receive window: this petit-client predates the "
                    "server's window negotiation; upgrade it"
                )
            proven.extend(ids)
            vitae.update(hello.vitae, ip=remote)
            rejected = sorted(set(hello.claims) - set(ids))
            session.connection.settle_windows(hello.window)
            welcome = {
                "accepted": ids,
                "rejected": rejected,
                "endpoints": {rid: self.config.endpoint_for(rid) for rid in ids},
                "vitae": self.config.vitae,
                "window": session.connection.offered_window,
                **place,  # the client keeps a session to each worker
            }
            return json.dumps(welcome).encode()

        try:
            with trio.fail_after(self.config.handshake_timeout):
                await session.handshake_as_server(nonce, check_hello)
        except (PetitError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            self._report(remote, "tunnel from %s refused: %s", str(exc) or "handshake timeout")
            return
        if not proven:  # a worker the client already holds (above): nothing to attach
            log.debug("tunnel from %s: this worker is already held, the client dials again", remote)
            return
        attachment = Attachment(session, proven, remote, vitae)
        self.hub.attach(attachment)
        log.info("tunnel from %s serves %s", remote, ", ".join(proven))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._close_once_unregistered, attachment, nursery.cancel_scope)
                await session.serve()
                nursery.cancel_scope.cancel()
        except* (RemoteProtocolError, KeepaliveTimeoutError, trio.BrokenResourceError) as group:
            reason = group.exceptions[0]
            log.info("tunnel from %s for %s ended: %s", remote, ", ".join(proven), reason)
        else:
            log.info(
                "tunnel from %s for %s closed: %s", remote, ", ".join(proven), session.close_reason
            )
        finally:
            self.hub.detach(attachment)

    async def _close_once_unregistered(
        self, attachment: Attachment, serving: trio.CancelScope
    ) -> None:
        """End a session all of whose registrations were unregistered (the hub already sent
        GOAWAY), once its in-flight streams finish, instead of keeping it alive for nothing."""
        await attachment.emptied.wait()
        log.info("tunnel from %s serves no registration any more: closing it", attachment.remote)
        with trio.move_on_after(self.config.shutdown_grace):
            await attachment.session.wait_idle()
        serving.cancel()

    async def _exchange(
        self,
        websocket: WebSocket,
        remote: str,
        kind: str,
        answer: Callable[[dict[str, object], bytes, str], Awaitable[dict[str, object]]],
    ) -> None:
        """One signed request: send a fresh nonce, read the ``kind`` request, send the reply.

        ``answer(request, nonce, remote)`` returns the reply, or raises PetitError to refuse
        with its message.
        """
        nonce = secrets.token_bytes(NONCE_SIZE)
        try:
            with trio.fail_after(self.config.handshake_timeout):
                await websocket.send_message(
                    messages.encode({"nonce": base64.b64encode(nonce).decode()})
                )
                message = await websocket.get_message()
                try:
                    request = messages.decode(message, what=kind)
                    if request.get("type") != kind:
                        raise RemoteProtocolError(f"{kind}: expected a message of type {kind!r}")
                    reply = await answer(request, nonce, remote)
                except RegistryUnavailableError as exc:
                    self._report(remote, f"{kind} from %s failed: %s", exc, level=logging.ERROR)
                    reply = {"type": "error", "error": str(exc)}
                except PetitError as exc:
                    self._report(remote, f"{kind} from %s refused: %s", exc)
                    reply = {"type": "error", "error": str(exc)}
                except OSError as exc:
                    log.error("%s from %s failed: cannot save the registry: %s", kind, remote, exc)
                    reply = {"type": "error", "error": "the server cannot save its registry"}
                await websocket.send_message(messages.encode(reply))
        except (RemoteProtocolError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            self._report(remote, f"{kind} from %s abandoned: %s", str(exc) or "timeout")

    def _report(
        self, remote: str, message: str, reason: object, *, level: int = logging.INFO
    ) -> None:
        """Log a refusal a peer can repeat at will: one line per peer and kind of message
        per interval, the next one counting those held back."""
        self.reports.log(level, (remote, message), trio.current_time(), message, remote, reason)

    async def _register(
        self, request: dict[str, object], nonce: bytes, remote: str
    ) -> dict[str, object]:
        if wait := self.registrations.seconds_to_wait(remote, trio.current_time()):
            raise RegistrationRateError(
                f"too many registrations from {remote}: try again in {math.ceil(wait)} s "
                "([server] registrationsPerMinute)"
            )
        public_key = _field_bytes(request, "public_key")
        signature = _field_bytes(request, "signature")
        vitae = decode_vitae(request.get("vitae", {}))
        if len(public_key) != 32:
            raise RemoteProtocolError("public_key must be a 32-byte Ed25519 key")
        transcript = register_transcript(nonce, self.certificate_fingerprint, public_key)
        if not verify(public_key, signature, transcript):
            raise AuthError("the registration is not signed by the key it registers")
        offered = request.get("token")
        token = token_to_present(
            offered if isinstance(offered, str) else None, require_token=self.config.require_token
        )
        registration = await self.registry.register(
            public_key, vitae, token=token, actor=f"tunnel:{remote}"
        )
        rid = registration.registration_id
        log.info("registered %s (port %d) from %s", rid, registration.port, remote)
        return {
            "type": "registered",
            "id": rid,
            "port": registration.port,
            "endpoint": self.config.endpoint_for(rid),
        }

    async def _unregister(
        self, request: dict[str, object], nonce: bytes, remote: str
    ) -> dict[str, object]:
        claimed = request.get("id")
        rid = claimed if isinstance(claimed, str) else ""
        signature = _field_bytes(request, "signature")
        # An unknown ID costs the same verification as a known one and gets the same answer,
        # so nobody learns which IDs exist.
        key = self.registry.public_key_of(rid)
        transcript = unregister_transcript(nonce, self.certificate_fingerprint, rid)
        if not verify(key or NOBODY_KEY, signature, transcript) or key is None:
            raise AuthError("unregistration refused: not proven with the registration's key")
        await self.registry.unregister(rid, actor=f"tunnel:{remote}")
        self.hub.forget(rid)
        log.info("unregistered %s from %s", rid, remote)
        return {"type": "unregistered", "id": rid}


def _field_bytes(request: dict[str, object], key: str) -> bytes:
    value = request.get(key)
    if not isinstance(value, str):
        raise RemoteProtocolError(f"'{key}' is required")
    return b64decode(value, what=key)
