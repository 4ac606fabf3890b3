"""Prometheus metrics, built from the usage store and the hub at each scrape.

A dedicated ``CollectorRegistry`` (never the process-global one) holds one collector that
reads the live counters, so nothing is counted twice. Per-registration series are bounded:
at most ``TOP_REGISTRATIONS`` registrations get a ``registration`` label of their own, the
busiest by traffic when a slot was free; once labelled a registration keeps its label for
the life of the process (so no series ever jumps backwards), and every other registration
is summed under ``registration="other"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from petit import __version__
from petit_server.edge.hub import Hub
from petit_server.usage import LATENCY_BUCKETS, STATUS_CLASSES, RegistrationUsage, UsageStore

TOP_REGISTRATIONS: Final = 20
OTHER: Final = "other"


class UsageCollector(Collector):
    """Reads the usage store, the registry's size and the hub's sessions at each scrape."""

    def __init__(self, usage: UsageStore, hub: Hub, registered: Callable[[], list[str]]) -> None:
        self._usage = usage
        self._hub = hub
        self._registered = registered
        self._labelled: set[str] = set()

    def collect(self) -> Iterator[Metric]:
        registered = self._registered()
        yield _gauge("petit_info", "Version of the running server.", 1, version=__version__)
        yield _gauge("petit_registrations", "Registrations in the registry.", len(registered))
        online = sum(self._hub.is_online(rid) for rid in registered)
        yield _gauge("petit_registrations_online", "Registrations a client serves now.", online)
        yield _gauge("petit_sessions", "Tunnel sessions connected.", len(self._hub.attachments()))
        yield _gauge("petit_streams_in_flight", "Tunnel streams open.", self._hub.active_streams)
        unrouted = CounterMetricFamily(
            "petit_unrouted_requests", "HTTP requests whose Host named no registration."
        )
        unrouted.add_metric([], self._usage.unrouted_requests)
        yield unrouted
        yield from self._per_registration(self._grouped(set(registered)))

    def _grouped(self, registered: set[str]) -> dict[str, RegistrationUsage]:
        """Usage by label: the labelled registrations, and the sum of the rest as ``other``.
        An unregistered ID gives its label up, and never gets one; what it had used counts
        in ``other`` from then on."""
        items = self._usage.items()
        self._labelled &= registered
        free = TOP_REGISTRATIONS - len(self._labelled)
        if free > 0:
            waiting = [
                (u.traffic, rid)
                for rid, u in items
                if rid in registered and rid not in self._labelled
            ]
            self._labelled.update(rid for traffic, rid in sorted(waiting)[-free:] if traffic)
        groups: dict[str, RegistrationUsage] = {OTHER: RegistrationUsage()}
        groups[OTHER].merge(self._usage.departed)  # so that no counter ever goes down
        for rid, usage in items:
            if rid in self._labelled:
                groups[rid] = usage
            else:
                groups[OTHER].merge(usage)
        return groups

    def _per_registration(self, groups: dict[str, RegistrationUsage]) -> Iterator[Metric]:
        label = ["registration"]
        requests = CounterMetricFamily(
            "petit_http_requests",
            "HTTP requests routed to a registration, by status class of the response.",
            labels=[*label, "code"],
        )
        outcomes = CounterMetricFamily(
            "petit_http_outcomes",
            "HTTP requests by outcome: success (the private service answered below 500), "
            "error (500 or more, or cut short), unavailable (petit answered for it).",
            labels=[*label, "outcome"],
        )
        received = CounterMetricFamily(
            "petit_http_received_bytes", "Bytes received from public HTTP callers.", labels=label
        )
        sent = CounterMetricFamily(
            "petit_http_sent_bytes", "Bytes sent to public HTTP callers.", labels=label
        )
        latency = HistogramMetricFamily(
            "petit_http_request_duration_seconds",
            "From a request's head to the end of its response.",
            labels=label,
        )
        tcp_connections = CounterMetricFamily(
            "petit_tcp_connections", "Raw TCP connections accepted.", labels=label
        )
        tcp_received = CounterMetricFamily(
            "petit_tcp_received_bytes", "Bytes received from raw TCP callers.", labels=label
        )
        tcp_sent = CounterMetricFamily(
            "petit_tcp_sent_bytes", "Bytes sent to raw TCP callers.", labels=label
        )
        for name, usage in groups.items():
            for status_class in STATUS_CLASSES:
                requests.add_metric([name, status_class], usage.statuses[status_class])
            outcomes.add_metric([name, "success"], usage.successes)
            outcomes.add_metric([name, "error"], usage.errors)
            outcomes.add_metric([name, "unavailable"], usage.unavailables)
            received.add_metric([name], usage.bytes_in)
            sent.add_metric([name], usage.bytes_out)
            cumulative, buckets = 0, []
            for bound, count in zip([*LATENCY_BUCKETS, "+Inf"], usage.latency_counts, strict=True):
                cumulative += count
                buckets.append((str(bound), float(cumulative)))
            latency.add_metric([name], buckets, usage.latency_sum)
            tcp_connections.add_metric([name], usage.tcp_connections)
            tcp_received.add_metric([name], usage.tcp.a_to_b)
            tcp_sent.add_metric([name], usage.tcp.b_to_a)
        yield from (requests, outcomes, received, sent, latency)
        yield from (tcp_connections, tcp_received, tcp_sent)


def _gauge(name: str, documentation: str, value: float, **labels: str) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation, labels=list(labels))
    gauge.add_metric(list(labels.values()), value)
    return gauge


class Metrics:
    """The server's own registry of metrics; ``render`` is the /metrics body."""

    def __init__(self, usage: UsageStore, hub: Hub, registered: Callable[[], list[str]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(UsageCollector(usage, hub, registered))

    def render(self) -> bytes:
        return generate_latest(self.registry)
