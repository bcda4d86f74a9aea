"""Live gateway series from the orchestrator's own Prometheus counters.

A sampler reads the cumulative counters (tokens, requests, request and step
seconds) every ``sample_s`` and keeps the snapshots for ``keep_s``; a point is
the difference between a snapshot and the one ``window_s`` earlier, as
Prometheus' ``rate()`` over a range would give. The counters move when a
request ends, so a window a few requests long smooths what a single interval
would show as bursts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from edgeorch.schemas.dashboard import DeploymentSeries, SeriesPoint, SeriesView


@dataclass(frozen=True)
class Counters:
    """One deployment's cumulative gateway counters at a moment."""

    tokens: float = 0.0
    requests: float = 0.0
    failed: float = 0.0
    request_s_sum: float = 0.0
    request_s_count: float = 0.0
    step_s_sum: float = 0.0
    step_s_count: float = 0.0

    def minus(self, older: Counters) -> Counters:
        """What happened between ``older`` and this snapshot."""
        return Counters(**{f.name: getattr(self, f.name) - getattr(older, f.name) for f in fields(self)})


# (metric attribute, sample name suffix, outcome label or None) -> Counters field
_READ = (
    ("tokens", "_total", None, "tokens"),
    ("requests", "_total", "ok", "requests"),
    ("requests", "_total", "failed", "failed"),
    ("request_seconds", "_sum", None, "request_s_sum"),
    ("request_seconds", "_count", None, "request_s_count"),
    ("step_seconds", "_sum", None, "step_s_sum"),
    ("step_seconds", "_count", None, "step_s_count"),
)


def read_counters(metrics: Any) -> dict[str, Counters]:
    """Every deployment's counters from an ``OrchestratorMetrics`` (prometheus_client collectors)."""
    acc: dict[str, dict[str, float]] = {}
    for attr, suffix, outcome, field in _READ:
        for family in getattr(metrics, attr).collect():
            for s in family.samples:
                if not s.name.endswith(suffix) or (outcome and s.labels.get("outcome") != outcome):
                    continue
                row = acc.setdefault(s.labels["deployment"], {})
                row[field] = row.get(field, 0.0) + s.value
    return {name: Counters(**row) for name, row in acc.items()}


def point(t: float, dt: float, d: Counters) -> SeriesPoint:
    """The figures of one window of length ``dt`` ending at ``t``, from its counter differences."""
    return SeriesPoint(
        t=t, requests=round(d.requests), failed=round(d.failed),
        tokens_per_s=d.tokens / dt if dt > 0 else 0.0,
        request_latency_s=d.request_s_sum / d.request_s_count if d.request_s_count > 0 else None,
        step_s=d.step_s_sum / d.step_s_count if d.step_s_count > 0 else None,
    )  # fmt: skip


class SeriesRecorder:
    """Counter snapshots over the last ``keep_s`` seconds, turned into windowed points on demand."""

    def __init__(self, sample_s: float = 2.0, window_s: float = 10.0, keep_s: float = 600.0):
        if sample_s <= 0 or window_s < sample_s or keep_s < window_s:
            raise ValueError("need 0 < sample_s <= window_s <= keep_s")
        self.sample_s, self.window_s, self.keep_s = sample_s, window_s, keep_s
        self._lag = max(1, round(window_s / sample_s))
        self._snapshots: deque[tuple[float, Mapping[str, Counters]]] = deque(
            maxlen=round(keep_s / sample_s) + self._lag + 1
        )

    def record(self, t: float, counters: Mapping[str, Counters]) -> None:
        """Keep one snapshot taken at Unix time ``t`` (times must not go backwards)."""
        if self._snapshots and t < self._snapshots[-1][0]:
            raise ValueError("snapshots must come in time order")
        self._snapshots.append((t, dict(counters)))

    def view(self, last_s: float | None = None) -> SeriesView:
        """A point per snapshot that has one ``window_s`` before it; only the last ``last_s`` seconds."""
        snaps = list(self._snapshots)
        end = snaps[-1][0] if snaps else 0.0
        per: dict[str, list[SeriesPoint]] = {}
        for i in range(self._lag, len(snaps)):
            t, now = snaps[i]
            if last_s is not None and t < end - last_s:
                continue
            t0, before = snaps[i - self._lag]
            for name, c in now.items():
                per.setdefault(name, []).append(point(t, t - t0, c.minus(before.get(name, Counters()))))
        series = [DeploymentSeries(deployment=n, points=p) for n, p in sorted(per.items())]
        return SeriesView(sample_s=self.sample_s, window_s=self.window_s, series=series)
