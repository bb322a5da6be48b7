"""The metrics of ``GET /metrics``: the gateway's registry (:class:`ApiMetrics`) and the
per-device counters, read from each link's statistics at scrape time.

    keeplink_device_protocol_errors_total{device}   malformed input dropped (the link goes on)
    keeplink_device_late_replies_total{device}      replies for no request in flight
    keeplink_device_reconnects_total{device}        completed handshakes after the first
    keeplink_device_requests_total{device,outcome}  resolved requests: acknowledged, rejected,
                                                    timed_out, cancelled, unavailable

Devices behind one hub (a Modbus gateway, an MQTT broker) share their hub's link, so each
of them shows that link's counters.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from keeplink._core.commands import CommandState
from keeplink.gateway.runtime import Gateway

__all__ = ["ApiMetrics", "DeviceCounters"]


class DeviceCounters(Collector):
    """A Prometheus collector: register it once; every scrape reads the links afresh."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def collect(self) -> Iterator[Metric]:
        protocol = CounterMetricFamily(
            "keeplink_device_protocol_errors",
            "Malformed input from the device, dropped (the link goes on)",
            labels=["device"],
        )
        late = CounterMetricFamily(
            "keeplink_device_late_replies",
            "Replies that matched no request in flight (late, or an unknown seq), dropped",
            labels=["device"],
        )
        reconnects = CounterMetricFamily(
            "keeplink_device_reconnects",
            "Completed handshakes after the first",
            labels=["device"],
        )
        requests = CounterMetricFamily(
            "keeplink_device_requests",
            "Resolved requests by outcome",
            labels=["device", "outcome"],
        )
        for device, link in self._gateway.links.items():
            stats = link.statistics()
            protocol.add_metric([device], stats.protocol_errors)
            late.add_metric([device], stats.late_replies)
            reconnects.add_metric([device], max(0, stats.connects - 1))
            for outcome, count in sorted(stats.outcomes.items()):
                requests.add_metric([device, outcome], count)
        yield from (protocol, late, reconnects, requests)


class ApiMetrics:
    """The gateway's own Prometheus registry (``GET /metrics``): links by state, request
    outcomes, queue depths, delivery latency, event stream clients, and the per-device
    counters. Made once per API app; it observes each delivery as it happens."""

    def __init__(self, gateway: Gateway) -> None:
        self.registry = CollectorRegistry()
        self.links = Gauge("keeplink_links", "Links by state", ["state"], registry=self.registry)
        self.reconnects = Gauge(
            "keeplink_reconnects_total",
            "Completed handshakes after the first, all links",
            registry=self.registry,
        )
        self.requests = Gauge(
            "keeplink_requests_total",
            "Requests by outcome, all links",
            ["outcome"],
            registry=self.registry,
        )
        self.queue = Gauge(
            "keeplink_queue_depth", "Queued commands", ["device"], registry=self.registry
        )
        self.latency = Histogram(
            "keeplink_delivery_latency_seconds",
            "From submit to acknowledged",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 86400),
            registry=self.registry,
        )
        self.websockets = Gauge(
            "keeplink_api_websockets",
            "Event stream clients connected now",
            registry=self.registry,
        )
        self.delivered = Counter(
            "keeplink_delivered_total", "Commands acknowledged", registry=self.registry
        )
        self.registry.register(DeviceCounters(gateway))
        gateway.on_delivered = self._observe

    def _observe(self, latency: float) -> None:
        self.latency.observe(max(latency, 0.0))
        self.delivered.inc()

    async def render(self, gateway: Gateway, *, websockets: int = 0) -> bytes:
        self.websockets.set(websockets)
        for state in (
            "idle",
            "connecting",
            "handshaking",
            "connected",
            "lost",
            "backoff",
            "stopping",
            "stopped",
            "failed",
        ):
            self.links.labels(state=state).set(gateway.link_counts().get(state, 0))
        reconnects = 0
        outcomes: dict[str, int] = {}
        for link in gateway.links.values():
            stats = link.statistics()
            reconnects += max(0, stats.connects - 1)
            for name, count in stats.outcomes.items():
                outcomes[name] = outcomes.get(name, 0) + count
        self.reconnects.set(reconnects)
        for name, count in outcomes.items():
            self.requests.labels(outcome=name).set(count)
        for device in gateway.devices:
            depth = await gateway.store.count(device=device, states=[CommandState.QUEUED])
            self.queue.labels(device=device).set(depth)
        return generate_latest(self.registry)
