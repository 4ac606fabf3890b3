"""The admin API: JSON about registrations, sessions and usage, /metrics and a dashboard.

# Theory of operation

- Served by ``petit.httpapi`` (h11 over trio, keep-alive, heads and bodies bounded in size
  and time). Loopback only by default (``adminAddr``).
- Every endpoint but the dashboard page needs ``Authorization: Bearer <adminToken>``,
  compared in constant time. The page itself holds no data: its script sends the token,
  which it reads from the URL fragment (never sent to a server) or asks for.
- The original's read endpoints keep their shapes (``/status``, ``/registry``, ``/ping``,
  ``/usage/<id>``, ``/stats/<id>``, ``/counts/*``), now with real data; ``/sessions``,
  ``/aliases``, ``/errors`` and ``/policy/<id>`` are new. Changes (adding and removing
  aliases, ``PUT /policy/<id>``) go through the same registry calls as the control port and
  are written to the audit log (``petit.audit``), as are refused tokens. No CORS headers:
  other origins cannot read.
- Usage answers come from the registry's shared totals when it keeps them (Redis: every
  node's requests, ``"source": "shared"``), else from this process's memory (a file: no
  ``source``, as always; Redis unreadable for now: ``"source": "node"`` and why).
  ``/metrics`` and ``/errors`` are always this node's.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from importlib.resources import files
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qs, unquote, urlsplit

from petit import __version__
from petit.httpapi import HttpError, Reply, Request, allow, json_reply
from petit.logs import audit
from petit_server.edge.hub import Hub
from petit_server.policy import PolicyError
from petit_server.registry.base import (
    Registration,
    Registry,
    RegistryError,
    RegistryUnavailableError,
)
from petit_server.usage import RegistrationUsage, UsageStore

if TYPE_CHECKING:
    from petit_server.ops.metrics import Metrics

COUNT_WINDOW: Final = 30 * 24 * 3600.0  # seconds: /counts/registers' default window
COUNT_TYPES: Final = {
    "requests": ("successes", "errors", "unavailables"),
    "success": ("successes",),
    "error": ("errors",),
    "unavailable": ("unavailables",),
    "errors": ("errors", "unavailables"),
}
DASHBOARD_HEADERS: Final = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        b"connect-src 'self'; img-src data:; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
]


@dataclass(frozen=True, slots=True)
class AdminSources:
    """What the API reads and changes, bound once the server holds its registry."""

    registry: Registry
    hub: Hub
    usage: UsageStore
    status: Callable[[str | None], dict[str, object]]  # the control port's STATUS reply
    # The control port's registry commands; ``actor`` goes into their audit records.
    registry_command: Callable[..., Awaitable[dict[str, object] | None]]
    started: float  # wall-clock time the server started


class AdminApi:
    """Routes one parsed request to its answer; ``petit.httpapi.serve_api`` does the HTTP."""

    def __init__(self, token: str, sources: AdminSources) -> None:
        self._token = token.encode()
        self._sources = sources
        self._metrics: Metrics | None = None  # built at the first scrape (see ``_scrape``)
        self._dashboard = files("petit_server.ops").joinpath("dashboard.html").read_bytes()

    def _scrape(self) -> bytes:
        """/metrics. prometheus_client and its imports (1.3 MB of the server's RSS) are
        loaded at the first scrape, not by a server nobody scrapes."""
        if self._metrics is None:
            from petit_server.ops.metrics import Metrics  # only once scraped

            self._metrics = Metrics(self._sources.usage, self._sources.hub, self._registered_ids)
        return self._metrics.render()

    async def answer(self, request: Request) -> Reply:
        """The reply to one request; HttpError becomes its JSON error."""
        method, body, peer = request.method, request.body, request.peer
        url = urlsplit(request.target)
        path = url.path.rstrip("/") or "/"
        if path in ("/", "/dashboard"):
            allow(method, "GET")
            return Reply(
                200, self._dashboard, b"text/html; charset=utf-8", tuple(DASHBOARD_HEADERS)
            )
        self._check_token(request.headers.get(b"authorization", b""), peer, method, path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if path == "/metrics":
            allow(method, "GET")
            return Reply(200, self._scrape(), b"text/plain; version=0.0.4; charset=utf-8")
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts == ["aliases"] and method == "POST":
            return json_reply(await self._add_alias(body, peer))
        if parts[0] == "aliases" and len(parts) == 2 and method == "DELETE":
            return json_reply(await self._remove_alias(parts[1], peer))
        if parts[0] == "policy" and len(parts) == 2 and method == "PUT":
            return json_reply(await self._set_policy(parts[1], body, peer))
        allow(method, "GET")
        return json_reply(await self._read(parts, query))

    def _check_token(self, authorization: bytes, peer: str, method: str, path: str) -> None:
        scheme, _, presented = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(presented.strip(), self._token):
            why = "wrong token" if authorization else "no token"
            audit(
                "admin.denied",
                f"admin API: refused {method} {path} from {peer}: {why}",
                actor=f"admin:{peer}",
                method=method,
                path=path,
            )
            raise HttpError(
                401,
                "a valid admin token is required (Authorization: Bearer <adminToken>)",
                [(b"www-authenticate", b'Bearer realm="petit-admin"')],
            )

    async def _read(self, parts: list[str], query: dict[str, str]) -> dict[str, object]:
        match parts:
            case ["ping"]:
                return {"success": True, "version": __version__, "uptime": self._uptime()}
            case ["status"]:
                return self._status_summary()
            case ["registry"]:
                return self._sources.status(None)
            case ["registry", rid]:
                return _found(self._sources.status(rid))
            case ["policy", rid]:
                registration = self._known(rid)
                return {"success": True, "id": rid, "policy": registration.policy.to_json()}
            case ["usage"]:
                every, source = await self._usage_of(self._registered_ids())
                as_json = {rid: usage.to_json() for rid, usage in every.items()}
                return {"success": True, "registrations": as_json, **source}
            case ["usage", rid]:
                self._known(rid)
                usage, source = await self._usage_of([rid])
                online = self._sources.hub.is_online(rid)
                return {
                    "success": True,
                    "registeredId": rid,
                    "online": online,
                    **usage[rid].to_json(),
                    **source,
                }
            case ["stats", rid]:
                self._known(rid)
                usage, source = await self._usage_of([rid])
                return {
                    "successes": usage[rid].successes,
                    "errors": usage[rid].errors,
                    "unavailables": usage[rid].unavailables,
                    **source,
                }
            case ["counts", "requests" | "errors" as kind]:
                fields = COUNT_TYPES.get(query.get("type", kind))
                if fields is None:
                    raise HttpError(400, f"type must be one of {', '.join(COUNT_TYPES)}")
                every, source = await self._usage_of(self._registered_ids())
                count = sum(getattr(u, name) for u in every.values() for name in fields)
                return {"count": count, **source}
            case ["counts", kind]:
                return {"count": self._count(kind, query)}
            case ["sessions"]:
                return {"success": True, "sessions": self._sessions()}
            case ["aliases"]:
                return {"success": True, "aliases": dict(sorted(self._alias_owners().items()))}
            case ["errors"]:
                recent = [e.to_json() for e in reversed(self._sources.usage.recent_errors)]
                return {"success": True, "errors": recent}
        raise HttpError(404, f"no such endpoint /{'/'.join(parts)}")

    def _alias_owners(self) -> dict[str, str]:
        return {a: r.registration_id for r in self._sources.registry.all() for a in r.aliases}

    def _registered_ids(self) -> list[str]:
        return [r.registration_id for r in self._sources.registry.all()]

    def _known(self, rid: str) -> Registration:
        registration = self._sources.registry.get(rid)
        if registration is None:
            raise HttpError(404, f"No such registeredId {rid}.")
        return registration

    def _uptime(self) -> float:
        return round(time.time() - self._sources.started, 3)

    async def _usage_of(
        self, ids: list[str]
    ) -> tuple[dict[str, RegistrationUsage], dict[str, object]]:
        """These registrations' usage, and where it comes from (see the module docstring)."""
        this_node = {rid: self._sources.usage.of(rid) for rid in ids}
        try:
            shared = await self._sources.registry.usage_totals(ids)
        except (RegistryError, RegistryUnavailableError) as exc:
            return this_node, {"source": "node", "sharedUnavailable": str(exc)}
        if shared is None:
            return this_node, {}  # not shared (a file): no source, as always
        return shared, {"source": "shared"}

    def _status_summary(self) -> dict[str, object]:
        ids = self._registered_ids()
        online = {rid: self._sources.hub.is_online(rid) for rid in ids}
        connected = [rid for rid in ids if online[rid]]
        disconnected = [rid for rid in ids if not online[rid]]
        return {
            "success": True,
            "total": len(ids),
            "connected": connected,
            "disconnected": disconnected,
            "sessions": len(self._sources.hub.attachments()),
            "streams": self._sources.hub.active_streams,
            "uptime": self._uptime(),
        }

    def _count(self, kind: str, query: dict[str, str]) -> int:
        ids = self._registered_ids()
        match kind:
            case "registrations":
                return len(ids)
            case "online":
                return sum(self._sources.hub.is_online(rid) for rid in ids)
            case "registers":
                end = _instant(query.get("end"), time.time())
                start = _instant(query.get("start"), end - COUNT_WINDOW)
                return sum(start <= r.created <= end for r in self._sources.registry.all())
        raise HttpError(
            404, f"no such count {kind}: registrations, online, registers, requests, errors"
        )

    def _sessions(self) -> list[dict[str, object]]:
        return [
            {
                "registeredIds": list(a.registration_ids),
                "remote": a.remote,
                "since": a.since,
                "vitae": a.vitae,
                "streams": a.session.active_streams,
                "draining": a.session.going_away is not None,
            }
            for a in self._sources.hub.attachments()
        ]

    async def _add_alias(self, body: bytes, peer: str) -> dict[str, object]:
        request = _json_body(body)
        alias, rid = request.get("alias"), request.get("registeredId")
        if not isinstance(alias, str) or not isinstance(rid, str):
            raise HttpError(400, 'expected {"alias": "<hostname>", "registeredId": "<ID>"}')
        self._known(rid)
        return await self._change(["ADDALIAS", rid, alias], peer)

    async def _set_policy(self, rid: str, body: bytes, peer: str) -> dict[str, object]:
        """``PUT /policy/<id>`` with ``{"key": value, ...}``; null resets a key."""
        self._known(rid)
        try:
            policy = await self._sources.registry.set_policy(
                rid, _json_body(body), actor=f"admin:{peer}"
            )
        except (PolicyError, RegistryError, RegistryUnavailableError) as exc:
            raise HttpError(400, str(exc)) from None
        return {"success": True, "id": rid, "policy": policy.to_json()}

    async def _remove_alias(self, alias: str, peer: str) -> dict[str, object]:
        if alias.lower() not in self._alias_owners():
            raise HttpError(404, f"{alias} is not an alias.")
        return await self._change(["DELALIAS", alias], peer)

    async def _change(self, command: list[str], peer: str) -> dict[str, object]:
        """Run a registry command; the registry writes its audit record, naming us."""
        if any(word.split() != [word] for word in command):
            raise HttpError(400, "alias and ID must be single words")
        verb, *args = command
        reply = await self._sources.registry_command(verb, args, actor=f"admin:{peer}")
        assert reply is not None, f"{verb} is a registry command"
        if reply.get("success") is not True:
            raise HttpError(400, str(reply.get("error")))
        return reply


def _found(reply: dict[str, object]) -> dict[str, object]:
    """A control-port reply, or its refusal (an unknown ID) as 404."""
    if reply.get("success") is False:
        raise HttpError(404, str(reply.get("error")))
    return reply


def _json_body(body: bytes) -> dict[str, object]:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HttpError(400, f"the body is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise HttpError(400, "the body must be a JSON object")
    return document


def _instant(value: str | None, default: float) -> float:
    """A time given as ISO 8601 or as milliseconds since the epoch (as the original took)."""
    if value is None:
        return default
    try:
        return float(value) / 1000
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise HttpError(400, f"not a time: {value!r} (ISO 8601 or epoch milliseconds)") from None
