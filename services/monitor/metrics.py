"""Prometheus metrics of the monitor."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class MonitorMetrics:
    """Heartbeats received, events by kind, nodes alive."""

    def __init__(self, registry: CollectorRegistry):
        self.heartbeats = Counter("edgeorch_monitor_heartbeats", "Heartbeats received", registry=registry)
        self.events = Counter("edgeorch_monitor_events", "Events detected", ["kind"], registry=registry)
        self.nodes_alive = Gauge("edgeorch_monitor_nodes_alive", "Nodes currently alive", registry=registry)
