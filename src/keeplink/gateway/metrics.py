"""Per-device counters for ``GET /metrics``, read from each link's statistics at scrape time.

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

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from keeplink.gateway.runtime import Gateway

__all__ = ["DeviceCounters"]


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
