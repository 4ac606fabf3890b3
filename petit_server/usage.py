"""Usage statistics per registration, recorded by the ingress and the raw TCP ports.

# Theory of operation

- Everything is plain counters in memory: requests, status classes, bytes each way, a latency
  histogram with fixed buckets, when last seen, and raw TCP connections and bytes. Methods
  are synchronous (trio switches tasks only at ``await``), so no lock is needed.
- Counters only grow, and every field adds up: two snapshots of the same registration merge
  by adding counts and taking the later ``lastSeen``. That is what lets a store be persisted
  elsewhere (``to_json``/``from_json``/``merge``) and what Prometheus counters need.
- With a shared store (the Redis registry), ``unflushed`` gives what each registration
  recorded since the last flush and ``flushed`` marks it as added there: deltas, so several
  nodes and restarts add up, and a flush that failed is simply part of the next one. The
  only extra memory is one baseline ``RegistrationUsage`` per ID.
- The ingress sees each request through a ``RequestMeter``: one per public connection, fed
  the bytes read and written, the response status and the registration the Host named; it
  records the request when its response is complete or cut short.
- A few recent failures (5xx, and responses cut short) are kept for the dashboard, without
  headers or query strings, which may hold credentials.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

import trio

from petit.session import Traffic

# Upper bounds (seconds) of the latency histogram's buckets; one more bucket holds the rest.
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STATUS_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx")
# Counter names of the buckets and status classes in RegistrationUsage.counters
LATENCY_KEYS: Final = (*(f"latency:{bound}" for bound in LATENCY_BUCKETS), "latency:+Inf")
STATUS_KEYS: Final = tuple(f"status:{name}" for name in STATUS_CLASSES)
RECENT_ERRORS: Final = 50  # failures kept for the dashboard


@dataclass(slots=True)
class RegistrationUsage:
    """One registration's counters since they were first recorded."""

    requests: int = 0
    statuses: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUS_CLASSES, 0))
    successes: int = 0  # the private service answered below 500
    errors: int = 0  # the private service answered 500 or more, or the response was cut short
    unavailables: int = 0  # petit answered for it: client offline, service unreachable, timeout
    bytes_in: int = 0  # from public callers (request heads and bodies)
    bytes_out: int = 0  # to public callers (response heads and bodies)
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0  # seconds
    last_seen: float | None = None  # wall-clock time of the last request or TCP connection
    tcp: Traffic = field(default_factory=Traffic)  # a_to_b: from callers, b_to_a: to callers
    tcp_connections: int = 0

    def to_json(self) -> dict[str, object]:
        """Plain JSON; the admin API serves it and a persistent store may keep it."""
        return {
            "requests": self.requests,
            "statuses": dict(self.statuses),
            "successes": self.successes,
            "errors": self.errors,
            "unavailables": self.unavailables,
            "bytesIn": self.bytes_in,
            "bytesOut": self.bytes_out,
            "latency": {
                "buckets": [*LATENCY_BUCKETS, "+Inf"],
                "counts": list(self.latency_counts),
                "sum": self.latency_sum,
            },
            "lastSeen": self.last_seen,
            "tcp": {
                "connections": self.tcp_connections,
                "bytesIn": self.tcp.a_to_b,
                "bytesOut": self.tcp.b_to_a,
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> RegistrationUsage:
        """The inverse of ``to_json`` (for a store that persisted it); bad shapes raise."""
        latency = _mapping(data["latency"])
        tcp = _mapping(data["tcp"])
        counts = [_count(c) for c in _sequence(latency["counts"])]
        if len(counts) != len(LATENCY_BUCKETS) + 1:
            raise ValueError("latency counts do not match the buckets")
        statuses = _mapping(data["statuses"])
        last_seen = data.get("lastSeen")
        return cls(
            requests=_count(data["requests"]),
            statuses={name: _count(statuses.get(name, 0)) for name in STATUS_CLASSES},
            successes=_count(data["successes"]),
            errors=_count(data["errors"]),
            unavailables=_count(data["unavailables"]),
            bytes_in=_count(data["bytesIn"]),
            bytes_out=_count(data["bytesOut"]),
            latency_counts=counts,
            latency_sum=float(_number(latency["sum"])),
            last_seen=None if last_seen is None else float(_number(last_seen)),
            tcp=Traffic(_count(tcp["bytesIn"]), _count(tcp["bytesOut"])),
            tcp_connections=_count(tcp["connections"]),
        )

    def merge(self, other: RegistrationUsage) -> None:
        """Add ``other``'s counts to ours (e.g. a persisted total and this process's)."""
        self.requests += other.requests
        for name in STATUS_CLASSES:
            self.statuses[name] += other.statuses[name]
        self.successes += other.successes
        self.errors += other.errors
        self.unavailables += other.unavailables
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.latency_counts = [
            a + b for a, b in zip(self.latency_counts, other.latency_counts, strict=True)
        ]
        self.latency_sum += other.latency_sum
        seen = [t for t in (self.last_seen, other.last_seen) if t is not None]
        self.last_seen = max(seen, default=None)
        self.tcp.a_to_b += other.tcp.a_to_b
        self.tcp.b_to_a += other.tcp.b_to_a
        self.tcp_connections += other.tcp_connections

    def counters(self) -> dict[str, int | float]:
        """Every count under a flat name (a shared store keeps them as one hash per ID and
        adds to them); ``lastSeen``, a time, is not a count and is kept apart."""
        return {
            "requests": self.requests,
            **{
                key: self.statuses[name]
                for key, name in zip(STATUS_KEYS, STATUS_CLASSES, strict=True)
            },
            "successes": self.successes,
            "errors": self.errors,
            "unavailables": self.unavailables,
            "bytesIn": self.bytes_in,
            "bytesOut": self.bytes_out,
            **dict(zip(LATENCY_KEYS, self.latency_counts, strict=True)),
            "latencySum": self.latency_sum,
            "tcpConnections": self.tcp_connections,
            "tcpBytesIn": self.tcp.a_to_b,
            "tcpBytesOut": self.tcp.b_to_a,
        }

    @classmethod
    def from_counters(cls, fields: Mapping[str, str | int | float]) -> RegistrationUsage:
        """The inverse of ``counters``, plus an optional ``lastSeen``; a missing count is 0,
        a value that is not a number raises ValueError."""
        count = {name: int(fields.get(name, 0)) for name in COUNT_NAMES}
        last_seen = fields.get("lastSeen")
        return cls(
            requests=count["requests"],
            statuses={
                name: count[key] for key, name in zip(STATUS_KEYS, STATUS_CLASSES, strict=True)
            },
            successes=count["successes"],
            errors=count["errors"],
            unavailables=count["unavailables"],
            bytes_in=count["bytesIn"],
            bytes_out=count["bytesOut"],
            latency_counts=[count[key] for key in LATENCY_KEYS],
            latency_sum=float(fields.get("latencySum", 0.0)),
            last_seen=None if last_seen is None else float(last_seen),
            tcp=Traffic(count["tcpBytesIn"], count["tcpBytesOut"]),
            tcp_connections=count["tcpConnections"],
        )

    def since(self, earlier: RegistrationUsage) -> RegistrationUsage:
        """What was recorded after ``earlier`` (a past state of these same counters);
        ``last_seen`` only if it moved."""
        before = earlier.counters()
        delta = RegistrationUsage.from_counters(
            {name: value - before[name] for name, value in self.counters().items()}
        )
        delta.last_seen = None if self.last_seen == earlier.last_seen else self.last_seen
        return delta

    @property
    def progress(self) -> tuple[int, int, int, int]:
        """What every recording moves (a request its count, TCP its connections or bytes): if
        this is unchanged, so is every counter."""
        return (self.requests, self.tcp_connections, self.tcp.a_to_b, self.tcp.b_to_a)

    @property
    def traffic(self) -> int:
        """Bytes both ways, HTTP and TCP: what ranks registrations for metrics labels."""
        return self.bytes_in + self.bytes_out + self.tcp.a_to_b + self.tcp.b_to_a


NOTHING: Final = RegistrationUsage()  # never changed: the baseline of what was never flushed
COUNT_NAMES: Final = tuple(name for name in NOTHING.counters() if name != "latencySum")


@dataclass(frozen=True, slots=True)
class RecentError:
    """One failed request, for the dashboard: no headers, no query string."""

    at: float  # wall-clock time
    registration_id: str
    status: int  # 0: no response was sent
    method: str
    path: str

    def to_json(self) -> dict[str, object]:
        return {
            "at": self.at,
            "registeredId": self.registration_id,
            "status": self.status,
            "method": self.method,
            "path": self.path,
        }


class UsageStore:
    """Every registration's usage, plus requests whose Host named no registration."""

    def __init__(self) -> None:
        self._by_id: dict[str, RegistrationUsage] = {}
        self._flushed: dict[str, RegistrationUsage] = {}  # what a shared store already has
        self.departed = RegistrationUsage()  # the sum of what unregistered IDs had used
        self.unrouted_requests = 0
        self.recent_errors: deque[RecentError] = deque(maxlen=RECENT_ERRORS)

    def of(self, registration_id: str) -> RegistrationUsage:
        """The registration's usage (zeros if nothing was recorded yet)."""
        usage = self._by_id.get(registration_id)
        if usage is None:
            usage = self._by_id[registration_id] = RegistrationUsage()
        return usage

    def forget(self, registration_id: str) -> None:
        """Drop an unregistered ID's usage, so the store does not keep every ID ever seen; its
        counts move to ``departed``, so totals (and Prometheus counters) never go down."""
        usage = self._by_id.pop(registration_id, None)
        self._flushed.pop(registration_id, None)
        if usage is not None:
            self.departed.merge(usage)

    def unflushed(self) -> dict[str, RegistrationUsage]:
        """What each registration recorded since its last ``flushed`` (those that did)."""
        deltas = {}
        for rid, usage in self._by_id.items():
            baseline = self._flushed.get(rid) or NOTHING
            if usage.progress != baseline.progress:  # cheap: most IDs are idle most of the time
                deltas[rid] = usage.since(baseline)
        return deltas

    def flushed(self, deltas: Mapping[str, RegistrationUsage]) -> None:
        """These deltas (from ``unflushed``) are now in the shared store."""
        for rid, delta in deltas.items():
            if rid in self._by_id:  # else forgotten meanwhile: the shared store drops it too
                self._flushed.setdefault(rid, RegistrationUsage()).merge(delta)

    def items(self) -> list[tuple[str, RegistrationUsage]]:
        """Every registration with recorded usage, by ID."""
        return sorted(self._by_id.items())

    def record_request(
        self,
        registration_id: str,
        *,
        status: int,
        unavailable: bool,
        complete: bool,
        bytes_in: int,
        bytes_out: int,
        seconds: float,
    ) -> None:
        """One request routed to ``registration_id``. ``unavailable``: petit answered for the
        private service; ``complete``: the whole response reached the caller."""
        usage = self.of(registration_id)
        usage.requests += 1
        if 100 <= status < 600:
            usage.statuses[f"{status // 100}xx"] += 1
        if unavailable:
            usage.unavailables += 1
        elif complete and status < 500:
            usage.successes += 1
        else:
            usage.errors += 1
        usage.bytes_in += bytes_in
        usage.bytes_out += bytes_out
        usage.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        usage.latency_sum += seconds
        usage.last_seen = time.time()

    def record_tcp_connection(self, registration_id: str) -> Traffic:
        """One raw TCP connection accepted; splice it with the returned counters."""
        usage = self.of(registration_id)
        usage.tcp_connections += 1
        usage.last_seen = time.time()
        return usage.tcp

    def to_json(self) -> dict[str, object]:
        """The whole store as plain JSON (for a persistent store)."""
        return {
            "registrations": {rid: usage.to_json() for rid, usage in self.items()},
            "unroutedRequests": self.unrouted_requests,
        }

    def merge_json(self, data: Mapping[str, object]) -> None:
        """Add a ``to_json`` snapshot's counts to ours; raises ValueError/KeyError if malformed."""
        for rid, usage in _mapping(data["registrations"]).items():
            self.of(rid).merge(RegistrationUsage.from_json(_mapping(usage)))
        self.unrouted_requests += _count(data["unroutedRequests"])


class RequestMeter:
    """Attributes one public connection's bytes, status and time to its requests.

    The ingress calls ``received``/``sent`` for every read and write, ``begin`` once a
    request head is parsed, ``routed`` with its registration, ``refused`` when it answers
    for the private service, and ``end`` when the response is done or cut short.
    """

    __slots__ = (
        "_bytes_in",
        "_bytes_out",
        "_method",
        "_path",
        "_refused",
        "_registration_id",
        "_started",
        "_status",
        "_store",
    )

    def __init__(self, store: UsageStore | None) -> None:
        self._store = store
        self._bytes_in = self._bytes_out = 0
        self._started: float | None = None
        self._registration_id: str | None = None
        self._status = 0
        self._refused = False
        self._method = self._path = ""

    def received(self, size: int) -> None:
        self._bytes_in += size

    def sent(self, size: int, status: int | None = None) -> None:
        """``size`` bytes written to the caller; ``status``: they began the final response
        (or a 101)."""
        self._bytes_out += size
        if status is not None:
            self._status = status

    def carried(self, received: int, sent: int) -> None:
        """Bytes relayed as they are after a protocol switch (a WebSocket's frames)."""
        self._bytes_in += received
        self._bytes_out += sent

    def begin(self, method: bytes, target: bytes) -> None:
        self._started = trio.current_time()
        self._method = method.decode("ascii", "replace")
        self._path = target.split(b"?", 1)[0][:200].decode("ascii", "replace")

    def routed(self, registration_id: str) -> None:
        self._registration_id = registration_id

    def refused(self) -> None:
        """Petit answers for the private service (unless a response already began)."""
        self._refused = self._status == 0

    def end(self, *, complete: bool, read_ahead: int = 0) -> None:
        """Record the request begun last, if any. ``read_ahead``: bytes already received
        that belong to the next request (pipelined); they count for that one."""
        if self._started is None or self._store is None:
            self._started = None
            return
        store, rid = self._store, self._registration_id
        if rid is None:
            store.unrouted_requests += 1
        else:
            store.record_request(
                rid,
                status=self._status,
                unavailable=self._refused,
                complete=complete,
                bytes_in=self._bytes_in - read_ahead,
                bytes_out=self._bytes_out,
                seconds=trio.current_time() - self._started,
            )
            if self._status >= 500 or not complete:
                store.recent_errors.append(
                    RecentError(time.time(), rid, self._status, self._method, self._path)
                )
        self._bytes_in, self._bytes_out, self._status = read_ahead, 0, 0
        self._started = self._registration_id = None
        self._refused = False


def _mapping(value: object) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected an object, got {value!r}")
    return value


def _sequence(value: object) -> Iterable[object]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list, got {value!r}")
    return value


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {value!r}")
    return value


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a count, got {value!r}")
    return value
