"""Prometheus metrics of the broadcast service, in a registry owned by its app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_PREPARE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_DRAIN_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class BroadcastMetrics:
    """Rollouts by outcome; prepare, commit and drain times; acks by result."""

    def __init__(self, registry: CollectorRegistry):
        self.rollouts = Counter(
            "edgeorch_broadcast_rollouts", "Rollouts by outcome (started, completed, aborted)",
            ["outcome"], registry=registry,
        )  # fmt: skip
        self.prepare_seconds = Histogram(
            "edgeorch_broadcast_prepare_seconds", "Rollout created until every affected worker acked",
            registry=registry, buckets=_PREPARE_BUCKETS,
        )  # fmt: skip
        self.commit_seconds = Histogram(
            "edgeorch_broadcast_commit_seconds", "Last ack until COMMIT is durable and published",
            registry=registry, buckets=_COMMIT_BUCKETS,
        )  # fmt: skip
        self.drain_seconds = Histogram(
            "edgeorch_broadcast_drain_seconds", "COMMIT until the old version is released",
            registry=registry, buckets=_DRAIN_BUCKETS,
        )  # fmt: skip
        self.acks = Counter(
            "edgeorch_broadcast_acks", "Acks received by result (ok, failed, refused)", ["result"],
            registry=registry,
        )  # fmt: skip
        self.in_flight = Gauge(
            "edgeorch_broadcast_rollouts_in_flight", "Rollouts preparing or draining", registry=registry
        )
