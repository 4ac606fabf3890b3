"""Raw TCP ports: each online registration's port carries plain bytes to its private service.

# Theory of operation

- One manager task follows the upstreams (the hub; on a cluster node, also the registrations
  other nodes hold): whenever they change it compares the registrations that are served with
  the ports that listen, opens the missing listeners and
  cancels the ones whose registration went offline, so the port is free at once.
- Each accepted connection opens one tunnel stream to the registration (bounded by
  ``open_timeout``) and is spliced to it; a refused or timed-out open closes the connection.
  The registration's policy holds here too: a visitor its allow/deny lists refuse is closed
  at once, and its own openTimeout and maxStreams apply. So do the public connection limits
  (``ConnectionLimits``, shared with the HTTP ingress): past maxConnections in all or
  maxConnectionsPerAddress from the visitor's address, the connection is closed at once.
- Accepted connections run in the server's handler nursery, not under their listener: closing
  a listener does not cut them. They end with their tunnel stream, which is at once when the
  registration went offline because its session died; on shutdown they get the drain grace.
- A port that cannot be bound (already in use) is logged once and reported by ``status_of``;
  it is tried again when the registration next comes online.
- On a cluster node another node may hold a registration this node's registry mirror has not
  loaded yet (the Redis registry catches up within a poll). Nothing announces that load, so
  while any served registration is unknown the manager looks again every ``UNKNOWN_RETRY``.
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import trio

from petit.connection import StreamKind, stream_target
from petit.listen import open_listeners, serve_listeners, show_address, strangers_listening
from petit.logs import Throttled
from petit.session import StreamRefusedError, splice
from petit_server.edge.hub import Upstreams
from petit_server.edge.ingress import ConnectionLimits
from petit_server.policy import Policy
from petit_server.registry.base import Registration
from petit_server.usage import UsageStore

log = logging.getLogger("petit.tcpports")
_bugs = Throttled(log)  # a bug a peer can trigger at will logs once per interval

UNKNOWN_RETRY = 0.25  # seconds between looks for a served registration the registry lacks


@dataclass(slots=True)
class _Listener:
    """One registration's listener task: cancel ``scope`` to close it; ``closed`` then fires."""

    port: int
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    closed: trio.Event = field(default_factory=trio.Event)


class TcpPorts:
    """Opens and closes the registrations' raw TCP ports as they come online and go offline."""

    def __init__(
        self,
        upstreams: Upstreams,
        registration_for: Callable[[str], Registration | None],
        *,
        host: str,
        open_timeout: float,
        usage: UsageStore | None = None,
        policy_of: Callable[[str], Policy] = lambda _: Policy(),
        limits: ConnectionLimits | None = None,
        shared: bool = False,
    ) -> None:
        """``limits``: the public connection limits, shared with the HTTP ingress (else
        the defaults, for these ports alone); ``shared``: each port is bound by every
        worker (``petit.listen``)."""
        self._upstreams = upstreams
        self._shared = shared
        self._limits = ConnectionLimits() if limits is None else limits
        self._registration_for = registration_for
        self._policy_of = policy_of  # the policy a registration's visitors meet
        self._host = host
        self._open_timeout = open_timeout
        self._usage = usage
        self._listeners: dict[str, _Listener] = {}
        self._closing: dict[str, trio.Event] = {}  # set once a cancelled listener let go
        self._listening: set[str] = set()
        self._errors: dict[str, str] = {}

    def status_of(self, registration_id: str) -> dict[str, object]:
        """For STATUS: whether the registration's TCP port listens, and why not ("" if fine)."""
        return {
            "tcpListening": registration_id in self._listening,
            "tcpError": self._errors.get(registration_id, ""),
        }

    async def run(
        self,
        handler_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Follow the upstreams until cancelled; cancelling closes every listener."""
        async with trio.open_nursery() as listeners:
            task_status.started()
            while True:
                changed = self._upstreams.changed  # taken first: a change while we work is not lost
                complete = self._reconcile(listeners, handler_nursery)
                with trio.move_on_after(math.inf if complete else UNKNOWN_RETRY):
                    await changed.wait()

    def _reconcile(self, listeners: trio.Nursery, handler_nursery: trio.Nursery) -> bool:
        """Open and close listeners; False if a served registration is not in the registry."""
        served = self._upstreams.served_ids()
        wanted = {
            rid: registration.port
            for rid in served
            if (registration := self._registration_for(rid)) is not None
        }
        for rid, listener in list(self._listeners.items()):
            if wanted.get(rid) != listener.port:
                listener.scope.cancel()
                self._listening.discard(rid)
                self._closing[rid] = listener.closed
                del self._listeners[rid]
                self._errors.pop(rid, None)
        for rid, port in wanted.items():
            if rid not in self._listeners:
                previous = self._closing.pop(rid, None)
                listener = _Listener(port)
                self._listeners[rid] = listener
                listeners.start_soon(self._listen, rid, listener, previous, handler_nursery)
        return len(wanted) == len(served)

    async def _listen(
        self,
        registration_id: str,
        listener: _Listener,
        previous: trio.Event | None,
        handler_nursery: trio.Nursery,
    ) -> None:
        try:
            with listener.scope:
                if previous is not None:
                    await previous.wait()  # its socket is closed: the port is ours to bind
                await self._bind_and_serve(registration_id, listener.port, handler_nursery)
        finally:
            listener.closed.set()

    async def _bind_and_serve(
        self, registration_id: str, port: int, handler_nursery: trio.Nursery
    ) -> None:
        try:
            if self._shared:  # SO_REUSEPORT would let another process's socket in: refuse
                strangers: int = await trio.to_thread.run_sync(strangers_listening, port)
                if strangers:
                    raise OSError(errno.EADDRINUSE, "in use by another process")
            sockets = await open_listeners(port, self._host, shared=self._shared)
        except OSError as exc:
            reason = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            message = f"cannot listen on TCP {show_address(self._host, port)}: {reason}"
            self._errors[registration_id] = message
            log.error(
                "registration %s: %s; free the port, then reconnect the client",
                registration_id,
                message,
            )
            return
        self._listening.add(registration_id)
        log.info(
            "registration %s: TCP port %s open", registration_id, show_address(self._host, port)
        )
        try:
            await serve_listeners(
                partial(self._carry, registration_id),
                sockets,
                what=f"TCP port {port} of registration {registration_id}",
                handler_nursery=handler_nursery,
            )
        finally:
            log.info("registration %s: TCP port %d closed", registration_id, port)

    async def _carry(self, registration_id: str, connection: trio.SocketStream) -> None:
        """Splice one accepted connection to a fresh tunnel stream (trio closes the socket)."""
        try:
            await self._splice_to_tunnel(registration_id, connection)
        except Exception:  # noqa: BLE001 - per-connection boundary: log the bug, keep the rest
            _bugs.bug(
                trio.current_time(), "bug while carrying a TCP connection for %s", registration_id
            )

    async def _splice_to_tunnel(self, registration_id: str, connection: trio.SocketStream) -> None:
        policy = self._policy_of(registration_id)
        visitor = str(connection.socket.getpeername()[0])
        if not policy.admits(visitor):  # its allow/deny lists hold on its TCP port too
            log.debug(
                "TCP connection for %s from %s refused by its policy", registration_id, visitor
            )
            return
        if not self._limits.admit(visitor):
            return
        try:
            await self._carry_admitted(registration_id, connection, policy)
        finally:
            self._limits.release(visitor)

    async def _carry_admitted(
        self, registration_id: str, connection: trio.SocketStream, policy: Policy
    ) -> None:
        try:
            with trio.fail_after(policy.open_timeout or self._open_timeout):
                stream = await self._upstreams.open_stream(
                    stream_target(registration_id, StreamKind.TCP)
                )
        except (StreamRefusedError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            log.info("TCP connection for %s refused: %s", registration_id, str(exc) or "timeout")
            return
        traffic = (
            None if self._usage is None else self._usage.record_tcp_connection(registration_id)
        )
        try:
            await splice(connection, stream, traffic)
        finally:
            await stream.aclose()
