"""Prometheus metrics of a worker, in a registry owned by its app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_COMPUTE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class WorkerMetrics:
    """Stage compute time (per stage and per unit), bytes in and out, requests, errors."""

    def __init__(self, registry: CollectorRegistry):
        self.compute_seconds = Histogram(
            "edgeorch_worker_stage_compute_seconds", "Compute time of one step of a stage",
            ["stage"], registry=registry, buckets=_COMPUTE_BUCKETS,
        )  # fmt: skip
        self.unit_compute_seconds = Histogram(
            "edgeorch_worker_unit_compute_seconds", "Compute time of one step divided by the stage's units",
            ["stage"], registry=registry, buckets=_COMPUTE_BUCKETS,
        )  # fmt: skip
        self.bytes_in = Counter(
            "edgeorch_worker_bytes_in", "Frame bytes received", ["stage"], registry=registry
        )
        self.bytes_out = Counter(
            "edgeorch_worker_bytes_out", "Frame bytes sent downstream", ["stage"], registry=registry
        )
        self.requests = Counter(
            "edgeorch_worker_requests", "Forward requests by outcome", ["stage", "status"], registry=registry
        )
        self.errors = Counter(
            "edgeorch_worker_errors", "Rejected or failed requests by kind", ["kind"], registry=registry
        )
        self.kv_bytes = Gauge(
            "edgeorch_worker_kv_cache_bytes", "Bytes held by session KV caches", registry=registry
        )
        self.sessions = Gauge("edgeorch_worker_sessions", "Live decoder sessions", registry=registry)

    def observe_compute(self, stage_id: str, seconds: float, units: int) -> None:
        """Record one step's compute time."""
        self.compute_seconds.labels(stage_id).observe(seconds)
        self.unit_compute_seconds.labels(stage_id).observe(seconds / max(units, 1))
