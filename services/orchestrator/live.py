"""What the orchestrator keeps in memory per deployment, shared by the control loop and the gateway."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

from edgeorch.orchestration.generation import Route
from edgeorch.planning.problem import Problem
from edgeorch.schemas.orchestrator import MeasuredView, PredictedView, QosPolicy
from edgeorch.schemas.profile import ModelProfile, profile_key


@dataclass
class Live:
    """One deployment's in-memory state (all of it can be rebuilt)."""

    name: str
    model: str
    policy: QosPolicy
    profile: ModelProfile
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    triggers: list[str] = field(default_factory=list)
    route: Route | None = None
    predicted: PredictedView | None = None
    steps: deque = field(
        default_factory=lambda: deque(maxlen=256)
    )  # (ended_at monotonic, version, step_s, load)
    requests: int = 0
    failed: int = 0
    measured_versions: set[int] = field(default_factory=set)
    last_periodic: float = field(default_factory=time.monotonic)
    pending: float | None = None  # since when a change has been predicted to pay off (monotonic)
    task: asyncio.Task | None = None
    # The measurements of the look that chose the committed plan, restricted to its routes' nodes:
    # what the gateway prices moving a session with (edgeorch/orchestration/move_cost.py). None: none yet.
    move_basis: Problem | None = None

    @property
    def profile_key(self) -> str:
        """What nodes calibrate this deployment under: its model in its weight format."""
        return profile_key(self.model, self.policy.weight_format)


def measured(live: Live | None) -> MeasuredView:
    """Median step time on the active version over recent requests."""
    if live is None:
        return MeasuredView(step_s=None, steps=0, requests=0, failed_requests=0, slo_attainment=None)
    version = live.route.version if live.route else None
    steps = [s for _, v, s, *_ in live.steps if v == version]  # decode steps only (no prefills)
    slo = live.policy.latency_slo_s
    return MeasuredView(
        step_s=statistics.median(steps[-64:]) if steps else None, steps=len(steps),
        requests=live.requests, failed_requests=live.failed,
        slo_attainment=(sum(s <= slo for s in steps[-64:]) / len(steps[-64:])) if slo and steps else None,
    )  # fmt: skip
