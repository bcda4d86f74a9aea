"""Keep, remap or re-split: the orchestrator's decision on a candidate plan (pure: no I/O).

A change costs something even when the splitter predicts a gain: weights
move, caches of new sessions start cold, and a prediction built on a few
seconds of measurements can be noise. So a voluntary change needs a
predicted relative gain of at least ``min_gain`` (hysteresis) and must wait
``cooldown_s`` after the previous one, so plans cannot flap between two
near-equal splits. A plan that can no longer serve (a node gone, memory now
short) is replaced at once, cooldown or not.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeorch.orchestration.snapshot import objective_value
from edgeorch.schemas.orchestrator import PredictedView, QosPolicy


@dataclass(frozen=True)
class Decision:
    """What to do with a candidate plan, and why (one line for the log)."""

    kind: str  # keep | remap | resplit
    change: bool
    reason: str
    gain: float | None = None


def decide(
    *,
    revision_kind: str,
    current_feasible: bool,
    current: PredictedView | None,
    candidate: PredictedView,
    policy: QosPolicy,
    now: float,
    last_change_at: float | None,
    trigger: str,
) -> Decision:
    """Decide on the splitter's candidate for the deployment's current plan."""
    if revision_kind == "keep":
        return Decision("keep", False, f"{trigger}: the current plan is still the best")
    if not current_feasible or current is None:
        return Decision(revision_kind, True, f"{trigger}: the current plan cannot serve any more")
    cur = objective_value(current, policy.objective)
    new = objective_value(candidate, policy.objective)
    gain = (cur - new) / cur if cur > 0 else 0.0
    unit = {"latency": "s", "energy": "J", "throughput": "s/token"}[policy.objective]
    figures = f"{policy.objective} {cur:.4g} {unit} -> {new:.4g} {unit} ({100 * gain:+.1f}%)"
    if gain < policy.min_gain:
        return Decision("keep", False, f"{trigger}: {figures}, below the {100 * policy.min_gain:.0f}% "
                                       "needed to change", gain)  # fmt: skip
    if last_change_at is not None and now - last_change_at < policy.cooldown_s:
        wait = policy.cooldown_s - (now - last_change_at)
        return Decision("keep", False, f"{trigger}: {figures}, but in cooldown for {wait:.1f}s more", gain)
    return Decision(revision_kind, True, f"{trigger}: {figures}", gain)
