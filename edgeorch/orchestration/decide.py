"""Keep, remap or re-split: the orchestrator's decision on a candidate plan (pure: no I/O).

A change costs something even when the splitter predicts a gain: weights
move, caches of new sessions start cold, and a prediction built on a few
seconds of measurements can be noise. So a voluntary change needs a
predicted relative gain of at least ``min_gain`` (hysteresis) and must wait
``cooldown_s`` after the previous one, so plans cannot flap between two
near-equal splits. A plan that can no longer serve (a node gone, memory now
short) is replaced at once, cooldown or not.

A predicted gain is confirmed either by a second look ``confirm_s`` later or,
at once, by :func:`measured_slowdown`: the plan's own decode steps of the last
moments running well above their earlier median. Noise in the node speeds
predicts gains without slowing the steps down; a real change does both. Such
a measured slowdown also lifts the cooldown: flapping between near-equal
plans is driven by noise, which does not slow the running plan down.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from edgeorch.orchestration.snapshot import objective_value, predict, with_formats
from edgeorch.planning import formats as activation
from edgeorch.schemas.orchestrator import PredictedView, QosPolicy
from edgeorch.schemas.plan import PlanRequest, PlanStage


@dataclass(frozen=True)
class Decision:
    """What to do with a candidate plan, and why (one line for the log)."""

    kind: str  # keep | remap | resplit | reformat
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
    slowed: float | None = None,
    less_lossy: bool = False,
) -> Decision:
    """Decide on the splitter's candidate for the deployment's current plan.

    ``slowed``: how many times slower the current plan's decode steps now run
    than before, when the caller measured a slowdown worth acting on (None:
    not measured, or not slowed). ``less_lossy``: the candidate is the same
    stages with fewer compressed hops (a ``reformat`` back toward fp32): the
    format choice found that compression no longer saves a real share of the
    latency, and exact answers need no gain to be worth having back.
    """
    if revision_kind == "keep":
        return Decision("keep", False, f"{trigger}: the current plan is still the best")
    if not current_feasible or current is None:
        return Decision(revision_kind, True, f"{trigger}: the current plan cannot serve any more")
    cur = objective_value(current, policy.objective)
    new = objective_value(candidate, policy.objective)
    gain = (cur - new) / cur if cur > 0 else 0.0
    unit = {"latency": "s", "energy": "J", "throughput": "s/token"}[policy.objective]
    figures = f"{policy.objective} {cur:.4g} {unit} -> {new:.4g} {unit} ({100 * gain:+.1f}%)"
    # A format change alone moves no weights and keeps each KV cache on its node: it needs less.
    need = policy.compress_min_gain if revision_kind == "reformat" else policy.min_gain
    if less_lossy:
        figures += "; back toward exact hops: compression no longer saves enough"
    elif gain < need:
        return Decision("keep", False, f"{trigger}: {figures}, below the {100 * need:.0f}% "
                                       "needed to change", gain)  # fmt: skip
    if last_change_at is not None and now - last_change_at < policy.cooldown_s:
        wait = policy.cooldown_s - (now - last_change_at)
        if slowed is None:
            return Decision(
                "keep", False, f"{trigger}: {figures}, but in cooldown for {wait:.1f}s more", gain
            )
        figures += f"; {wait:.1f}s of cooldown skipped: decode steps {slowed:.2f}x their earlier median"
    return Decision(revision_kind, True, f"{trigger}: {figures}", gain)


def unverified_hops(
    current: Iterable[PlanStage], candidate: Iterable[PlanStage], provisional: set[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The candidate's new hops whose link figures the monitor marks provisional (stale), in order.

    A voluntary move onto such a link trusts a figure nobody has checked
    since the node's uplink changed or since its heartbeats fell behind: when
    an uplink is capped, the links that carry traffic are re-measured first,
    and a plan that flees onto the others flees onto old figures (measured,
    issue 21: a re-split predicted at 3.15 s whose hops alone took 3.7 s;
    moves onto 524 Mbit/s figures of links capped at 5 Mbit/s ten seconds
    earlier). Hops the current plan already uses are measured by its traffic.
    """
    cur = list(current)
    used = {(a.node, b.node) for a, b in zip(cur, cur[1:], strict=False)}
    cand = list(candidate)
    hops = [(a.node, b.node) for a, b in zip(cand, cand[1:], strict=False) if a.node != b.node]
    return [h for h in dict.fromkeys(hops) if h in provisional and h not in used]


def quality_loss(stages: Iterable[PlanStage]) -> float:
    """Predicted share of greedy tokens that differ from an all-fp32 chain (the last stage sends no hop)."""
    stages = list(stages)
    return activation.quality_loss(s.activation_format for s in stages[:-1])


def reformat_candidate(
    req: PlanRequest,
    current: list[PlanStage],
    policy: QosPolicy,
    revision_kind: str,
    candidate: PredictedView | None,
    prefill: Mapping[str, float] | None = None,
) -> tuple[list[PlanStage], PredictedView] | None:
    """The current stages with each hop's format chosen anew, when that differs from what they carry.

    Returned (with its prediction) when the splitter would keep the stages,
    or when re-choosing the formats predicts at least as well as the
    splitter's re-placement (with its own formats): a format change moves no
    weights and keeps every KV cache on its node. None otherwise.
    """
    chosen = with_formats(req, current, policy, prefill)
    if chosen is None or [s.activation_format for s in chosen] == [s.activation_format for s in current]:
        return None
    predicted = predict(req, chosen, prefill)
    if predicted is None:
        return None
    if revision_kind != "keep" and candidate is not None:
        if objective_value(predicted, policy.objective) > objective_value(candidate, policy.objective):
            return None
    return chosen, predicted


SLOWDOWN_WINDOW_S = 1.5  # "recent" decode steps: those that ended this long ago at most
SLOWDOWN_MIN_RECENT = 4  # recent steps needed for a reading
SLOWDOWN_MIN_BASELINE = 16  # earlier steps needed for a reading
SLOWDOWN_BASELINE = 64  # earlier steps the baseline median is taken over (the latest ones)


SIMILAR_LOAD = 1.25  # baseline steps ran with at most this ratio of sessions to the recent ones


def measured_slowdown(
    steps: Iterable[tuple], version: int, now: float, window_s: float = SLOWDOWN_WINDOW_S
) -> float | None:
    """How many times slower one plan version's recent decode steps are than its earlier ones at the same load.

    ``steps`` holds ``(ended_at, version, seconds[, load])`` on one clock with
    ``now``; ``load`` is how many of the deployment's sessions were generating
    (1 when not given). More sessions make every step longer (they share the
    stages, in batches or in turn) without anything having changed, so the
    recent steps are compared only with earlier ones that ran under a similar
    load (within a factor ``SIMILAR_LOAD`` of the recent median): steady load
    reads 1.0, a node that slowed under that same load still reads its
    slowdown. The ratio is the median of the steps that ended in the last
    ``window_s`` over the median of the latest such earlier ones; None when
    either side has too few steps to say (a version that just started, an
    idle deployment, a load that just changed).
    """
    recent: list[tuple[float, int]] = []
    before: list[tuple[float, int]] = []
    for step in steps:
        ended_at, v, seconds = step[:3]
        if v == version:
            load = step[3] if len(step) > 3 else 1
            (recent if ended_at >= now - window_s else before).append((seconds, max(1, load)))
    if len(recent) < SLOWDOWN_MIN_RECENT:
        return None
    load_now = statistics.median(load for _, load in recent)
    similar = [s for s, load in before if max(load, load_now) / min(load, load_now) <= SIMILAR_LOAD]
    if len(similar) < SLOWDOWN_MIN_BASELINE:
        return None
    baseline = statistics.median(similar[-SLOWDOWN_BASELINE:])
    return statistics.median(s for s, _ in recent) / baseline if baseline > 0 else None
