"""Which live tunnel sessions serve which registration.

Plain data, synchronous methods (trio switches tasks only at ``await``). Several sessions
may serve one registration; new streams go round-robin to the ones not draining.

``Upstreams`` is what the ingress and the TCP ports need to reach a private service: the
Hub provides it on a single node, ``cluster.Cluster`` (the hub, else another node) on several.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from petit.connection import StreamKind, split_target, stream_target
from petit.logs import audit
from petit.session import SessionClosedError, TunnelSession
from petit_server.edge.bandwidth import Bandwidth
from petit_server.policy import Policy


class StreamLimitError(SessionClosedError):
    """The registration has as many streams open as it may (503 for the next caller)."""


class Upstreams(Protocol):
    """Where public connections for a registration go."""

    @property
    def changed(self) -> trio.Event:
        """Set (and replaced) whenever ``served_ids`` may have changed."""

    def served_ids(self) -> set[str]:
        """Registrations that can be reached now."""

    async def open_stream(self, target: str) -> trio.abc.HalfCloseableStream:
        """A new stream to a registration's private service (``target``: its ID), or to its
        client's tunnel check or its raw TCP port (``stream_target``).

        Raises:
            SessionClosedError: nobody serves the registration (503).
            StreamRefusedError: the private service refused (502).
        """


@dataclass(slots=True)
class Attachment:
    """One session's claim on the registrations it proved."""

    session: TunnelSession
    registration_ids: list[str]
    remote: str
    vitae: dict[str, str]
    since: float = field(default_factory=time.time)
    emptied: trio.Event = field(default_factory=trio.Event)  # set: all its IDs unregistered


class Hub:
    """Registration ID → sessions currently serving it."""

    def __init__(
        self,
        on_forget: Callable[[str], None] | None = None,
        *,
        max_streams_per_registration: int = 1000,
        policy_of: Callable[[str], Policy] = lambda _: Policy(),
    ) -> None:
        self._on_forget = on_forget  # told of every unregistered ID (the usage store forgets it)
        self._max_streams = max_streams_per_registration
        self._policy_of = policy_of  # a registration's own maxStreams and bandwidth
        self._bandwidth = Bandwidth()
        self._by_id: dict[str, list[Attachment]] = {}
        self._attachments: list[Attachment] = []
        self._turn = itertools.count()
        self.changed = trio.Event()

    def attach(self, attachment: Attachment) -> None:
        """Route the attachment's registrations to its session."""
        self._attachments.append(attachment)
        for rid in attachment.registration_ids:
            self._by_id.setdefault(rid, []).append(attachment)
        self._notify()

    def detach(self, attachment: Attachment) -> None:
        """Stop routing to a session that ended (at once, so callers get 503, not a hang)."""
        if attachment in self._attachments:
            self._attachments.remove(attachment)
        for rid in attachment.registration_ids:
            serving = self._by_id.get(rid, [])
            if attachment in serving:
                serving.remove(attachment)
            if not serving:
                self._by_id.pop(rid, None)
        self._notify()

    def forget(self, registration_id: str) -> None:
        """Stop routing an unregistered ID at once; a session left serving nothing goes away."""
        self._bandwidth.forget(registration_id)
        for attachment in self._by_id.pop(registration_id, []):
            attachment.registration_ids.remove(registration_id)
            if not attachment.registration_ids:
                attachment.session.go_away("registration unregistered")
                attachment.emptied.set()
                audit(
                    "session.evicted",
                    f"tunnel from {attachment.remote} evicted: {registration_id} unregistered",
                    actor="server",
                    id=registration_id,
                    remote=attachment.remote,
                )
        if self._on_forget is not None:
            self._on_forget(registration_id)
        self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def session_for(self, registration_id: str) -> TunnelSession | None:
        """A live, non-draining session serving this registration, or None (offline)."""
        candidates = [
            a.session
            for a in self._by_id.get(registration_id, [])
            if a.session.going_away is None and not a.session.closed.is_set()
        ]
        if not candidates:
            return None
        return candidates[next(self._turn) % len(candidates)]

    async def open_stream(self, target: str) -> trio.abc.HalfCloseableStream:
        """A new stream through one of the registration's sessions (see ``Upstreams``);
        ``target`` names the registration and what the stream carries (``stream_target``)."""
        registration_id, _ = split_target(target)
        session = self.session_for(registration_id)
        if session is None:
            raise SessionClosedError(f"registration {registration_id} is offline")
        serving = self._by_id.get(registration_id, [])
        targets = [stream_target(registration_id, kind) for kind in StreamKind]
        policy = self._policy_of(registration_id)
        own = policy.max_streams
        limit = self._max_streams if own is None else own
        if sum(a.session.streams_to(t) for a in serving for t in targets) >= limit:
            setting = "[server] maxStreamsPerRegistration" if own is None else "its maxStreams"
            raise StreamLimitError(
                f"registration {registration_id} has {limit} streams open, the most "
                f"{setting} allows"
            )
        stream = await session.open_stream(target)
        return self._bandwidth.cap(stream, registration_id, policy.bandwidth)

    def is_online(self, registration_id: str) -> bool:
        """True if a session serves this registration."""
        return self.session_for(registration_id) is not None

    def served_ids(self) -> set[str]:
        """Registrations at least one live session serves (draining ones included)."""
        return set(self._by_id)

    def attachments(self) -> list[Attachment]:
        """Every live attachment."""
        return list(self._attachments)

    def go_away_all(self, reason: str) -> None:
        """Ask every client to drain: no new streams, in-flight ones finish."""
        for attachment in self._attachments:
            attachment.session.go_away(reason)

    async def wait_idle(self) -> None:
        """Return once no session has a stream in flight."""
        for attachment in self.attachments():
            await attachment.session.wait_idle()

    @property
    def active_streams(self) -> int:
        """Streams in flight over all sessions."""
        return sum(a.session.active_streams for a in self._attachments)
