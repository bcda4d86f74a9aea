"""Prometheus metrics of the orchestrator: requests, tokens, latency, re-plans, SLO attainment."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class OrchestratorMetrics:
    """Per-deployment request and token counts, step and request latency, plan changes by kind."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("edgeorch_gateway_requests", "Gateway requests by deployment, endpoint and outcome",
                                ["deployment", "endpoint", "outcome"], registry=registry)  # fmt: skip
        self.tokens = Counter(
            "edgeorch_gateway_tokens", "Tokens generated", ["deployment"], registry=registry
        )
        self.request_seconds = Histogram(
            "edgeorch_gateway_request_seconds", "Wall time of a request", ["deployment"], registry=registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120),
        )  # fmt: skip
        self.step_seconds = Histogram(
            "edgeorch_gateway_step_seconds", "Time per generated token (one chain step)", ["deployment"],
            registry=registry, buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
        )  # fmt: skip
        self.tokens_per_s = Gauge("edgeorch_gateway_tokens_per_second", "Decode speed of the last request",
                                  ["deployment"], registry=registry)  # fmt: skip
        self.recoveries = Counter("edgeorch_gateway_recoveries", "Sessions carried over a failed stage",
                                  ["deployment"], registry=registry)  # fmt: skip
        self.replans = Counter("edgeorch_orchestrator_replans", "Committed plan changes by kind", ["kind"],
                               registry=registry)  # fmt: skip
        self.slo_attainment = Gauge("edgeorch_orchestrator_slo_attainment",
                                    "Share of recent steps within the latency SLO", ["deployment"],
                                    registry=registry)  # fmt: skip
