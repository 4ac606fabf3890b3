"""The usage store's arithmetic and the bound on metrics labels, without processes."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from petit_server.edge.hub import Hub
from petit_server.ops.metrics import OTHER, TOP_REGISTRATIONS, Metrics
from petit_server.usage import LATENCY_BUCKETS, NOTHING, RegistrationUsage, UsageStore


def record(
    store: UsageStore,
    rid: str,
    *,
    status: int = 200,
    size: int = 100,
    unavailable: bool = False,
    complete: bool = True,
    seconds: float = 0.02,
) -> None:
    """One request of ``size`` bytes in and twice that out."""
    store.record_request(
        rid,
        status=status,
        unavailable=unavailable,
        complete=complete,
        bytes_in=size,
        bytes_out=2 * size,
        seconds=seconds,
    )


def test_requests_are_classified_and_bucketed() -> None:
    store = UsageStore()
    record(store, "1001", status=200, seconds=0.001)
    record(store, "1001", status=404, seconds=0.3)
    record(store, "1001", status=502, seconds=100.0)
    record(store, "1001", status=503, unavailable=True, seconds=0.01)
    record(store, "1001", status=200, complete=False, seconds=0.01)
    usage = store.of("1001")
    assert usage.requests == 5
    assert usage.statuses == {"1xx": 0, "2xx": 2, "3xx": 0, "4xx": 1, "5xx": 2}
    assert (usage.successes, usage.errors, usage.unavailables) == (2, 2, 1)
    assert (usage.bytes_in, usage.bytes_out) == (500, 1000)
    assert usage.latency_counts[0] == 1  # 1 ms: the first bucket
    assert usage.latency_counts[LATENCY_BUCKETS.index(0.5)] == 1  # 300 ms
    assert usage.latency_counts[-1] == 1  # 100 s: past every bound
    assert sum(usage.latency_counts) == 5
    assert usage.latency_sum == pytest.approx(100.321)


def test_snapshots_round_trip_through_json_and_merge_by_adding() -> None:
    store = UsageStore()
    record(store, "1001")
    store.record_tcp_connection("1001").a_to_b += 7
    store.unrouted_requests = 3
    snapshot = json.loads(json.dumps(store.to_json()))
    restored = UsageStore()
    restored.merge_json(snapshot)
    assert restored.to_json() == store.to_json()
    restored.merge_json(snapshot)
    doubled = restored.of("1001")
    assert (doubled.requests, doubled.tcp_connections, doubled.tcp.a_to_b) == (2, 2, 14)
    assert doubled.statuses["2xx"] == 2
    assert sum(doubled.latency_counts) == 2
    assert restored.unrouted_requests == 6
    truncated = {**store.of("1001").to_json(), "latency": {"counts": [1], "sum": 0.0}}
    with pytest.raises(ValueError, match="latency counts"):
        RegistrationUsage.from_json(truncated)


def scrape(metrics: Metrics) -> dict[str, float]:
    """Bytes received by registration label."""
    text = metrics.render().decode()
    return {
        sample.labels["registration"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "petit_http_received_bytes_total"
    }


async def test_metrics_labels_are_bounded_and_sticky() -> None:
    store = UsageStore()
    ids = [str(1001 + n) for n in range(TOP_REGISTRATIONS + 10)]
    for n, rid in enumerate(ids):
        record(store, rid, size=n + 1)  # the later the ID, the busier
    metrics = Metrics(store, Hub(), lambda: ids)
    first = scrape(metrics)
    busiest = set(ids[-TOP_REGISTRATIONS:])
    assert set(first) == busiest | {OTHER}
    assert first[OTHER] == sum(range(1, 11))  # the ten quietest, summed
    record(store, ids[0], size=10_000)  # now the busiest of all, but every slot is taken
    second = scrape(metrics)
    assert set(second) == busiest | {OTHER}
    assert second[OTHER] == first[OTHER] + 10_000  # "other" only ever grows
    assert all(second[rid] == first[rid] for rid in busiest)


async def test_an_unregistered_id_gives_up_its_label_and_its_usage() -> None:
    store = UsageStore()
    ids = [str(1001 + n) for n in range(TOP_REGISTRATIONS + 1)]
    for n, rid in enumerate(ids):
        record(store, rid, size=n + 1)
    registered = list(ids)
    hub = Hub(on_forget=store.forget)
    metrics = Metrics(store, hub, lambda: registered)
    before = scrape(metrics)
    assert ids[0] not in before  # the quietest: every slot is taken
    gone = ids[-1]
    registered.remove(gone)
    hub.forget(gone)  # unregistered: the server tells the hub, the hub the usage store
    assert gone not in dict(store.items())
    record(store, gone)  # a request that was still in flight
    labels = scrape(metrics)
    assert gone not in labels
    assert ids[0] in labels  # the freed slot went to a registered ID
    assert set(labels) == set(registered) | {OTHER}
    # Its bytes (and the in-flight request's 100) now count in "other": nothing went down.
    assert labels[OTHER] == before[OTHER] - labels[ids[0]] + before[gone] + 100
    assert sum(labels.values()) == sum(before.values()) + 100


def test_counters_round_trip_through_strings() -> None:
    store = UsageStore()
    record(store, "1001", status=404, seconds=0.5)
    store.record_tcp_connection("1001").b_to_a += 9
    usage = store.of("1001")
    stored = {name: str(value) for name, value in usage.counters().items()}
    assert RegistrationUsage.from_counters({**stored, "lastSeen": repr(usage.last_seen)}) == usage
    with pytest.raises(ValueError, match="invalid literal"):
        RegistrationUsage.from_counters({"requests": "many"})


def test_flushed_deltas_add_up_and_a_failed_flush_is_retried_without_counting_twice() -> None:
    """What a shared store (Redis) does with deltas: adds them. Its total must always equal
    what the node recorded, however flushes succeed or fail."""
    store, shared = UsageStore(), RegistrationUsage()
    record(store, "1001")
    tcp = store.record_tcp_connection("1001")
    tcp.a_to_b += 7

    def flush(*, fails: bool = False) -> None:
        deltas = store.unflushed()
        if not fails:
            for delta in deltas.values():
                shared.merge(delta)
            store.flushed(deltas)

    flush()
    assert shared == store.of("1001")
    assert store.unflushed() == {}  # nothing new: nothing to add
    record(store, "1001", status=500)
    tcp.b_to_a += 3  # a splice still running moves the counters it was handed
    flush(fails=True)
    record(store, "1001", status=503, unavailable=True)
    flush()
    assert shared == store.of("1001")
    assert (shared.requests, shared.errors, shared.unavailables) == (3, 1, 1)
    assert (shared.tcp.a_to_b, shared.tcp.b_to_a) == (7, 3)
    tcp.a_to_b += 1  # bytes alone, no new request or connection: still a change
    assert store.unflushed()["1001"].counters() == {**NOTHING.counters(), "tcpBytesIn": 1}

    record(store, "1001")
    deltas = store.unflushed()
    store.forget("1001")  # unregistered while that flush ran: no baseline kept for it
    store.flushed(deltas)
    assert store.unflushed() == {}
    record(store, "1001")  # a request still in flight: a fresh delta, all of it
    assert store.unflushed()["1001"].requests == 1
