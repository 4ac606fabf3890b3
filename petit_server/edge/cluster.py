"""Several server nodes: a node directory in Redis and authenticated links between nodes.

# Theory of operation

- Directory: every node writes its record (node id, internal address, the registrations it
  holds tunnel sessions for) to Redis under ``<prefix>cluster:node:<id>`` with a TTL of
  ``nodeTimeout``, rewritten every ``heartbeatInterval`` and at once when its sessions
  change; the sorted set ``<prefix>cluster:nodes`` indexes the ids. ``<prefix>`` is
  ``[server.registry] prefix`` (default ``petit:``), so installations sharing one Redis
  under different prefixes have separate directories as they have separate registries.
  A node that dies stops rewriting, its key expires, and the others forget it within
  ``nodeTimeout`` plus one heartbeat. Each heartbeat also reads every record into a local
  cache, so routing a request never waits on Redis. While Redis is unreachable the last
  known records keep being used. When it comes back without this node's own record
  (restarted empty, or the outage outlasted ``nodeTimeout`` so every record expired), the
  other nodes have not republished yet either: for ``nodeTimeout`` a known node whose
  record is missing is kept as last seen (a live node republishes within one heartbeat),
  so no registration held elsewhere blinks out while the directory refills.
- Redis is reached with redis-py's synchronous client in a worker thread
  (``trio.to_thread.run_sync``), with socket timeouts: trio has no Redis client, redis-py's
  asyncio client needs an asyncio loop, and only one small call per heartbeat goes to Redis,
  so a thread costs nothing that matters and the trio loop never blocks.
- Peer links: a node that must forward a connection dials the holder's internal port once
  (TLS with the nodes' server certificate) and keeps one petit tunnel session on it, which
  then carries every forwarded connection as one stream, with its flow control and
  half-closes. The dialer plays the tunnel's server role (it opens streams), the listener the
  client role. The handshake proves on both sides that the peer knows the shared secret:
  HMAC-SHA256 over fresh nonces of both ends, the node ids and the fingerprint of the
  listener's certificate, compared in constant time. The secret never travels, a recorded
  handshake cannot be replayed, and a relay that terminates TLS itself fails the proof.
- A listener serves a link's streams from its own hub only, so a connection is forwarded
  at most once, never in a loop.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import logging
import math
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from petit.auth import decode_window, parse_json_object
from petit.connection import SERVER_WINDOW, Role, TunnelConnection, split_target
from petit.errors import AuthError, ConfigError, ErrorCode, PetitError
from petit.listen import open_listeners, serve_listeners
from petit.logs import Throttled
from petit.pki import certificate_fingerprint
from petit.session import (
    SessionClosedError,
    StreamCarrier,
    StreamRefusedError,
    TunnelSession,
    TunnelStream,
    splice,
)
from petit.tls import server_handshake
from petit_server.config import ClusterConfig
from petit_server.edge.hub import Hub
from petit_server.registry.base import redacted_url

log = logging.getLogger("petit.cluster")
_bugs = Throttled(log)  # a bug a peer can trigger at will logs once per interval

INDEX_GRACE = 3600_000  # ms after which a silent node's id leaves the index (its key is gone)
REDIS_TIMEOUT = 1.0  # seconds for one Redis connect or reply
LINK_SETUP_TIMEOUT = 3.0  # seconds to connect, handshake TLS and prove the secret to a peer
NONCE_BYTES = 32
NOT_HERE = ErrorCode.SHUTDOWN  # a link stream refused because this node no longer holds it


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """One other node, as the directory last saw it."""

    node_id: str
    host: str
    port: int
    registrations: frozenset[str]


def proof(secret: bytes, label: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 under the cluster secret over length-prefixed parts (no ambiguity)."""
    mac = hmac.new(secret, label, hashlib.sha256)
    for part in parts:
        mac.update(len(part).to_bytes(2, "big") + part)
    return mac.digest()


def _hex_field(document: dict[str, object], name: str) -> bytes:
    value = document.get(name)
    try:
        return bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        return b""


class Directory:
    """This node's record in Redis and a cache of every other node's."""

    def __init__(
        self,
        config: ClusterConfig,
        key_prefix: str,
        held: Callable[[], set[str]],
        on_peers_changed: Callable[[], None],
    ) -> None:
        try:
            import redis  # optional dependency, needed only in cluster mode
        except ImportError:
            raise ConfigError(
                "server.cluster needs the redis client: pip install 'petit[redis]'"
            ) from None
        self._redis = redis.Redis.from_url(
            config.redis_url,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),  # the heartbeat retries
        )
        self._redis_errors: tuple[type[Exception], ...] = (redis.RedisError, OSError)
        self._config = config
        self._node_index = f"{key_prefix}cluster:nodes"  # node id -> last heartbeat (ms)
        self._node_head = f"{key_prefix}cluster:node:"  # + node id: that node's record
        self._held = held
        self._on_peers_changed = on_peers_changed
        self.port = config.internal_port  # the bound internal port, once listening
        self._peers: dict[str, NodeRecord] = {}
        self._holders: dict[str, list[NodeRecord]] = {}
        self._dirty = trio.Event()
        self._reachable: bool | None = None  # None: not tried yet
        self._writing = trio.Lock()  # one write of our record at a time
        self._left = False  # withdrawn on shutdown: never published again
        self._published = False  # our record reached Redis at least once
        self._keep_missing_until = -math.inf  # trio time; see "comes back" in the header

    def holders(self, registration_id: str) -> list[NodeRecord]:
        """Other nodes holding a session for the registration (from the cache)."""
        return self._holders.get(registration_id, [])

    def remote_ids(self) -> set[str]:
        """Registrations some other node holds."""
        return set(self._holders)

    def peers(self) -> list[NodeRecord]:
        """Every other live node."""
        return list(self._peers.values())

    @property
    def reachable(self) -> bool:
        """Whether the last heartbeat reached Redis."""
        return bool(self._reachable)

    def mark_dirty(self) -> None:
        """Our sessions changed: publish at once rather than at the next heartbeat."""
        self._dirty.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Heartbeat until cancelled: publish our record, read everyone's."""
        task_status.started()
        while True:
            self._dirty = trio.Event()
            await self._beat()
            with trio.move_on_after(self._config.heartbeat_interval):
                await self._dirty.wait()

    async def leave(self) -> None:
        """Withdraw our record (on shutdown) so the others stop forwarding to us. The
        heartbeat goes on while streams drain (sessions detaching wake it) but writes nothing
        more: a write in flight lands first, then the withdrawal."""
        self._left = True
        with trio.move_on_after(REDIS_TIMEOUT * 2):
            async with self._writing:
                try:
                    await trio.to_thread.run_sync(self._leave_sync, abandon_on_cancel=True)
                except self._redis_errors as exc:
                    log.debug("cluster directory: could not withdraw this node: %s", exc)

    async def _beat(self) -> None:
        record = json.dumps(
            {
                "host": self._config.advertise_addr,
                "port": self.port,
                "ids": sorted(self._held()),
            }
        )
        try:
            async with self._writing:
                if self._left:
                    return
                raw = await trio.to_thread.run_sync(
                    partial(self._beat_sync, record), abandon_on_cancel=True
                )
        except self._redis_errors as exc:
            if self._reachable is not False:
                log.warning(
                    "cluster directory: redis at %s unreachable (%s); serving local sessions "
                    "and the nodes last seen until it is back",
                    redacted_url(self._config.redis_url),
                    exc,
                )
            self._reachable = False
            return
        if self._reachable is False:
            log.info("cluster directory: redis is back; this node's record is published again")
        self._reachable = True
        found_self, others = raw
        if self._published and not found_self:
            log.info(
                "cluster directory: redis had lost the node records (restarted, or they "
                "expired); keeping the nodes last seen for %gs while they publish again",
                self._config.node_timeout,
            )
            self._keep_missing_until = trio.current_time() + self._config.node_timeout
        self._published = True
        self._update(others)

    def _beat_sync(self, record: str) -> tuple[bool, list[tuple[str, Any]]]:
        """(worker thread) Write our record, then read every node's: two round trips.
        Also says whether our previous record was still there."""
        now = int(time.time() * 1000)
        me = self._config.node_id
        ttl = int(self._config.node_timeout * 1000)
        pipe = self._redis.pipeline(transaction=False)
        pipe.exists(self._node_head + me)
        pipe.set(self._node_head + me, record, px=ttl)
        pipe.zadd(self._node_index, {me: now})
        pipe.zremrangebyscore(self._node_index, "-inf", now - INDEX_GRACE)
        pipe.zrange(self._node_index, 0, -1)
        found_self, *_, members = pipe.execute()
        ids = [m.decode() if isinstance(m, bytes) else str(m) for m in members]
        others = [node_id for node_id in ids if node_id != me]
        keys = [self._node_head + node_id for node_id in others]
        values = self._redis.mget(keys) if others else []
        return bool(found_self), list(zip(others, values, strict=True))

    def _leave_sync(self) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.delete(self._node_head + self._config.node_id)
        pipe.zrem(self._node_index, self._config.node_id)
        pipe.execute()

    def _update(self, raw: list[tuple[str, Any]]) -> None:
        peers: dict[str, NodeRecord] = {}
        for node_id, value in raw:
            if value is None:
                continue  # expired: that node is gone
            try:
                document = json.loads(value)
                peers[node_id] = NodeRecord(
                    node_id,
                    str(document["host"]),
                    int(document["port"]),
                    frozenset(str(rid) for rid in document["ids"]),
                )
            except (ValueError, KeyError, TypeError):
                log.warning("cluster directory: ignoring a malformed record for node %s", node_id)
        if trio.current_time() < self._keep_missing_until:
            for node_id in self._peers.keys() - peers.keys():
                peers[node_id] = self._peers[node_id]  # not republished yet
        for gone in self._peers.keys() - peers.keys():
            log.info("cluster: node %s left", gone)
        for new in peers.keys() - self._peers.keys():
            log.info("cluster: node %s at %s:%d", new, peers[new].host, peers[new].port)
        holders: dict[str, list[NodeRecord]] = {}
        for node in peers.values():
            for rid in node.registrations:
                holders.setdefault(rid, []).append(node)
        changed = holders.keys() != self._holders.keys() or peers.keys() != self._peers.keys()
        self._peers, self._holders = peers, holders
        if changed:
            self._on_peers_changed()


class _PeerUnavailableError(PetitError):
    """A peer could not be reached or no longer holds the registration: try the next."""


class Cluster:
    """Where public connections go on a node of a cluster: its own hub first, else the node
    that holds the registration, over a peer link. Same interface as the Hub (Upstreams)."""

    def __init__(
        self,
        config: ClusterConfig,
        hub: Hub,
        *,
        key_prefix: str,
        ping_interval: float,
        open_timeout: float,
        handshake_timeout: float,
    ) -> None:
        self.config = config
        self._hub = hub
        self._secret = config.secret.encode()
        self._ping_interval = ping_interval
        self._open_timeout = open_timeout
        self._handshake_timeout = handshake_timeout
        self.directory = Directory(config, key_prefix, hub.served_ids, self._peers_changed)
        self.changed = trio.Event()
        self._links: dict[str, tuple[NodeRecord, TunnelSession]] = {}
        self._dialing: dict[str, trio.Lock] = {}
        self._link_nursery: trio.Nursery | None = None
        self._failed_at: dict[str, float] = {}  # node id -> when a dial or open last failed
        self._turn = itertools.count()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _peers_changed(self) -> None:
        """Forget the nodes gone from the directory (each new node ID would otherwise stay
        in these maps for good); a dial in progress keeps its lock."""
        live = {node.node_id for node in self.directory.peers()}
        self._dialing = {n: lock for n, lock in self._dialing.items() if n in live or lock.locked()}
        self._failed_at = {n: at for n, at in self._failed_at.items() if n in live}
        self._notify()

    # ---------------------------------------------------------------- Upstreams

    def served_ids(self) -> set[str]:
        """Registrations held by this node or any other."""
        return self._hub.served_ids() | self.directory.remote_ids()

    async def open_stream(self, target: str) -> trio.abc.HalfCloseableStream:
        """A stream to the registration's private service (``target``, see ``Upstreams``):
        through a local session if this node holds one, else forwarded to a node that does.

        Raises:
            SessionClosedError: no node serves the registration (503).
            StreamRefusedError: the private service, or a peer's link, refused (502).
            trio.TooSlowError: the peer's client did not answer in time (504).
        """
        registration_id, _ = split_target(target)
        try:
            return await self._hub.open_stream(target)
        except SessionClosedError:
            pass  # not held here, or its session just ended: ask the nodes that hold it
        refused: StreamRefusedError | None = None
        for node in self._in_order(self.directory.holders(registration_id)):
            try:
                stream = await self._open_remote(node, target)
            except _PeerUnavailableError as exc:
                log.debug("registration %s not served through %s: %s", registration_id, node, exc)
                self._failed_at[node.node_id] = trio.current_time()
                continue
            except StreamRefusedError as exc:
                if exc.code is not ErrorCode.AUTH:
                    raise
                refused = exc
                continue
            self._failed_at.pop(node.node_id, None)
            return stream
        if refused is not None:
            raise refused
        raise SessionClosedError(f"no node serves registration {registration_id}")

    def status(self) -> dict[str, object]:
        """For STATUS: this node, whether Redis answers, and the other nodes it knows."""
        return {
            "node": self.config.node_id,
            "redis": "ok" if self.directory.reachable else "unreachable",
            "peers": {
                node.node_id: {
                    "address": f"{node.host}:{node.port}",
                    "registrations": len(node.registrations),
                }
                for node in self.directory.peers()
            },
        }

    def _in_order(self, holders: list[NodeRecord]) -> list[NodeRecord]:
        """Holders round-robin, those that failed within nodeTimeout last (a dead node stays
        in the directory until its record expires; its turn should not cost every request)."""
        if not holders:
            return holders
        turn = next(self._turn) % len(holders)
        rotated = holders[turn:] + holders[:turn]
        recent = trio.current_time() - self.config.node_timeout
        return sorted(
            rotated, key=lambda node: self._failed_at.get(node.node_id, -math.inf) > recent
        )

    async def wait_idle(self) -> None:
        """Return once no forwarded stream is in flight (for the shutdown drain)."""
        for _, session in list(self._links.values()):
            await session.wait_idle()

    # ---------------------------------------------------------------- running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The heartbeat, the hub follower and the outgoing links, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._link_nursery = nursery
            await nursery.start(self.directory.run)
            nursery.start_soon(self._follow_hub)
            task_status.started()

    async def leave(self) -> None:
        """Leave the directory (shutdown): the other nodes stop forwarding here."""
        await self.directory.leave()

    async def _follow_hub(self) -> None:
        while True:
            changed = self._hub.changed
            await changed.wait()
            self.directory.mark_dirty()
            self._notify()

    # ---------------------------------------------------------------- dialing side

    async def _open_remote(self, node: NodeRecord, target: str) -> TunnelStream:
        session = await self._link_to(node)
        try:
            return await session.open_stream(target)
        except SessionClosedError as exc:
            raise _PeerUnavailableError(f"link closed: {exc}") from None
        except StreamRefusedError as exc:
            if exc.code is NOT_HERE:
                raise _PeerUnavailableError("no longer held there") from None
            if exc.code is ErrorCode.TIMEOUT:
                raise trio.TooSlowError from None
            raise

    async def _link_to(self, node: NodeRecord) -> TunnelSession:
        """The live link to ``node``, dialled now if there is none (one dial at a time)."""
        lock = self._dialing.setdefault(node.node_id, trio.Lock())
        async with lock:
            current = self._links.get(node.node_id)
            if current is not None:
                known, session = current
                usable = session.going_away is None and not session.closed.is_set()
                if usable and (known.host, known.port) == (node.host, node.port):
                    return session
                session.close("the node moved")
            session = await self._dial(node)
            assert self._link_nursery is not None, "run() starts before any forwarding"
            self._links[node.node_id] = (node, session)
            await self._link_nursery.start(self._run_link, node, session)
            return session

    async def _dial(self, node: NodeRecord) -> TunnelSession:
        try:
            with trio.fail_after(LINK_SETUP_TIMEOUT):
                tcp = await trio.open_tcp_stream(node.host, node.port)
        except (OSError, trio.TooSlowError) as exc:
            raise _PeerUnavailableError(f"cannot reach {node.host}:{node.port}: {exc}") from None
        tls = trio.SSLStream(tcp, _link_client_context(), server_hostname=node.host)
        session = TunnelSession(
            TunnelConnection(Role.SERVER, offered_window=SERVER_WINDOW),
            StreamCarrier(tls),
            ping_interval=self._ping_interval,
        )
        nonce = secrets.token_bytes(NONCE_BYTES)
        try:
            with trio.fail_after(LINK_SETUP_TIMEOUT):
                await tls.do_handshake()
                peer_der = tls.getpeercert(binary_form=True)
                fingerprint = certificate_fingerprint(peer_der or b"")
                check = partial(self._check_hello, session.connection, node, nonce, fingerprint)
                await session.handshake_as_server(nonce, check)
        except AuthError as exc:
            await trio.aclose_forcefully(tls)
            log.error("cluster: node %s failed the link proof: %s", node.node_id, exc)
            raise StreamRefusedError(ErrorCode.AUTH) from None
        except (PetitError, trio.BrokenResourceError, trio.TooSlowError, OSError) as exc:
            await trio.aclose_forcefully(tls)
            raise _PeerUnavailableError(f"link to {node.node_id} failed: {exc}") from None
        log.info("cluster: link to node %s at %s:%d up", node.node_id, node.host, node.port)
        return session

    async def _check_hello(
        self,
        connection: TunnelConnection,
        node: NodeRecord,
        nonce: bytes,
        fingerprint: bytes,
        payload: bytes,
    ) -> bytes:
        """The listener's proof; the WELCOME carries ours, and our window: the callers of the
        forwarded streams are here, so an unread one costs this node only SERVER_WINDOW."""
        hello = parse_json_object(payload, what="cluster hello")
        peer_nonce = _hex_field(hello, "nonce")
        peer_id = str(hello.get("node", ""))
        expected = proof(
            self._secret, b"petit-cluster hello", nonce, peer_nonce, fingerprint, peer_id.encode()
        )
        if len(peer_nonce) != NONCE_BYTES or not hmac.compare_digest(
            _hex_field(hello, "proof"), expected
        ):
            raise AuthError("the cluster secret does not match")
        if peer_id != node.node_id:
            raise AuthError(f"expected node {node.node_id}, reached {peer_id}")
        me = self.config.node_id.encode()
        ours = proof(
            self._secret,
            b"petit-cluster welcome",
            nonce,
            peer_nonce,
            fingerprint,
            me,
            peer_id.encode(),
        )
        connection.settle_windows(decode_window(hello, what="cluster hello"))
        welcome = {
            "node": self.config.node_id,
            "proof": ours.hex(),
            "window": connection.offered_window,
        }
        return json.dumps(welcome).encode()

    async def _run_link(
        self,
        node: NodeRecord,
        session: TunnelSession,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await session.serve(task_status=task_status)
        except (PetitError, trio.BrokenResourceError, OSError) as exc:
            log.info("cluster: link to node %s down: %s", node.node_id, exc)
        except Exception:  # noqa: BLE001 - per-link boundary: log the bug, keep the rest
            _bugs.bug(trio.current_time(), "cluster: bug on the link to node %s", node.node_id)
        finally:
            if self._links.get(node.node_id, (None, None))[1] is session:
                del self._links[node.node_id]

    # ---------------------------------------------------------------- listening side

    async def serve_links(
        self,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        fingerprint: bytes,
        handler_nursery: trio.Nursery,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept links from other nodes on the internal port; report the bound port."""
        listeners = await open_listeners(port, host)
        bound: int = listeners[0].socket.getsockname()[1]
        self.directory.port = bound
        task_status.started(bound)
        handler = partial(self._accept_link, ssl_context=ssl_context, fingerprint=fingerprint)
        await serve_listeners(
            handler, listeners, what="cluster port", handler_nursery=handler_nursery
        )

    async def _accept_link(
        self, tcp: trio.SocketStream, *, ssl_context: ssl.SSLContext, fingerprint: bytes
    ) -> None:
        peer: object = "a peer that left"
        tls = trio.SSLStream(tcp, ssl_context, server_side=True)
        session = TunnelSession(
            TunnelConnection(Role.CLIENT),
            StreamCarrier(tls),
            ping_interval=self._ping_interval,
            stream_handler=self._serve_forwarded,
        )
        nonce = secrets.token_bytes(NONCE_BYTES)
        me = self.config.node_id.encode()
        peer_id = ""
        challenges: list[bytes] = []

        def make_hello(challenge: bytes) -> bytes:
            challenges.append(challenge)
            mine = proof(self._secret, b"petit-cluster hello", challenge, nonce, fingerprint, me)
            document = {
                "node": self.config.node_id,
                "nonce": nonce.hex(),
                "proof": mine.hex(),
                "window": session.connection.offered_window,
            }
            return json.dumps(document).encode()

        try:
            peer = tcp.socket.getpeername()  # fails if the peer has already reset
            with trio.fail_after(self._handshake_timeout):
                await server_handshake(tls)
                welcome = parse_json_object(
                    await session.handshake_as_client(make_hello), what="cluster welcome"
                )
            peer_id = str(welcome.get("node", ""))
            expected = proof(
                self._secret,
                b"petit-cluster welcome",
                challenges[0],
                nonce,
                fingerprint,
                peer_id.encode(),
                me,
            )
            if not hmac.compare_digest(_hex_field(welcome, "proof"), expected):
                log.warning("cluster: refused a link from %s: the secret does not match", peer)
                return
            session.connection.settle_windows(decode_window(welcome, what="cluster welcome"))
            log.info("cluster: link from node %s (%s) up", peer_id, peer)
            await session.serve()
        except (PetitError, trio.BrokenResourceError, trio.TooSlowError, OSError) as exc:
            log.info("cluster: link from %s ended: %s", peer_id or peer, exc)
        except Exception:  # noqa: BLE001 - per-connection boundary: log the bug, keep the rest
            _bugs.bug(trio.current_time(), "cluster: bug on the link from %s", peer_id or peer)
        finally:
            await trio.aclose_forcefully(tls)

    async def _serve_forwarded(self, stream: TunnelStream, target: str) -> None:
        """One forwarded connection: a stream of this node's own hub, spliced (no re-forward)."""
        try:
            with trio.fail_after(self._open_timeout):
                upstream = await self._hub.open_stream(target)
        except SessionClosedError:
            stream.refuse(NOT_HERE)
            return
        except StreamRefusedError:
            stream.refuse(ErrorCode.REFUSED)
            return
        except trio.TooSlowError:
            stream.refuse(ErrorCode.TIMEOUT)
            return
        try:
            stream.accept()
            await splice(stream, upstream)
        finally:
            await upstream.aclose()


def _link_client_context() -> ssl.SSLContext:
    """TLS to a peer node without chain or hostname checks: the peer is authenticated by the
    HMAC proof bound to the certificate it presented, not by a CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
