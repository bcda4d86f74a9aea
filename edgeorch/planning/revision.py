"""Split Revision: how a new plan differs from the one serving now, and what moving costs.

``migration_bytes`` counts the parameter bytes of units that land on a node
that does not hold them now (KV caches are rebuilt, not moved, so they do not
count). The planner itself trades those bytes against the objective through
``migration_weight`` or ``max_migration_bytes``; this module only describes
the outcome so the orchestrator can decide keep / remap / resplit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from edgeorch.planning.cost import Evaluation, evaluate, violations
from edgeorch.planning.errors import Cause
from edgeorch.planning.problem import Problem, Stage

Keyed = tuple[str, int, int]  # (node id, start, end)


@dataclass(frozen=True)
class RevisionReport:
    """The change from the current plan to a new one."""

    kind: str
    migration_bytes: int
    moved_units: tuple[int, ...]
    current_feasible: bool
    current_evaluation: Evaluation | None
    current_violations: tuple[Cause, ...]


def merge_keyed(stages: Sequence[Keyed]) -> list[Keyed]:
    """Consecutive stages on the same node id as one."""
    out: list[Keyed] = []
    for node, start, end in stages:
        if out and out[-1][0] == node and out[-1][2] == start:
            out[-1] = (node, out[-1][1], end)
        else:
            out.append((node, start, end))
    return out


def classify(current: Sequence[Keyed], new: Sequence[Keyed]) -> str:
    """``keep`` (same stages, same nodes), ``remap`` (same ranges, other nodes) or ``resplit``."""
    cur, nxt = merge_keyed(current), merge_keyed(new)
    if cur == nxt:
        return "keep"
    if [(a, b) for _, a, b in cur] == [(a, b) for _, a, b in nxt]:
        return "remap"
    return "resplit"


def current_as_stages(problem: Problem) -> list[Stage] | None:
    """The current plan in node indices, or None when it uses a node that is gone."""
    if problem.current_stages is None:
        return None
    index = {nid: i for i, nid in enumerate(problem.node_ids)}
    if any(nid not in index for nid, _, _ in problem.current_stages):
        return None
    return [Stage(index[nid], a, b) for nid, a, b in problem.current_stages]


def revise(problem: Problem, stages: Sequence[Stage]) -> RevisionReport | None:
    """Describe ``stages`` against the problem's current plan (None without one)."""
    if problem.current_stages is None:
        return None
    ev = evaluate(problem, stages)
    keyed = [(problem.node_ids[s.node], s.start, s.end) for s in stages]
    current = current_as_stages(problem)
    if current is None:
        gone = sorted({nid for nid, _, _ in problem.current_stages} - set(problem.node_ids))
        broken = (
            Cause("node_gone", f"the current plan uses nodes that are gone: {gone}", nodes=tuple(gone)),
        )
        current_ev = None
    else:
        # The current plan is judged as it stands, not against a migration cap.
        as_is = dataclasses.replace(problem, max_migration_bytes=None)
        broken = tuple(violations(as_is, current))
        current_ev = evaluate(problem, current)
    return RevisionReport(
        kind=classify(problem.current_stages, keyed),
        migration_bytes=ev.migration_bytes,
        moved_units=ev.moved_units,
        current_feasible=not broken,
        current_evaluation=current_ev,
        current_violations=broken,
    )
