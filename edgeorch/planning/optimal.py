"""The optimal planner: relaxation, heuristics, branch and bound, final check.

1. Solve the per-stage relaxation (exact DP over (unit boundary, node)). If it
   has no solution, nothing is feasible: diagnose why.
2. If its plan also keeps every coupled limit (a node's memory and load over
   all its stages, link totals, the migration cap) it is optimal: done. This
   is the common case for latency.
3. Otherwise seed an incumbent with heuristic plans and run the branch and
   bound until it proves optimality or the time limit hits; then the answer
   says ``optimal: false`` with the bound it reached.
4. Check the chosen plan against the plain cost model once more; a plan that
   breaks a constraint never leaves this function.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import numpy as np

from edgeorch.planning.bounds import energy_bound, throughput_bound
from edgeorch.planning.cost import Evaluation, evaluate, score, violations
from edgeorch.planning.diagnose import diagnose, packing_causes
from edgeorch.planning.errors import Cause, InfeasibleError
from edgeorch.planning.heuristics import heuristic_plans
from edgeorch.planning.problem import Problem, Stage
from edgeorch.planning.relax import Constraints, Relaxer
from edgeorch.planning.search import Search

log = logging.getLogger(__name__)

OBJECTIVE_UNITS = {"latency": "s", "throughput": "s/token", "energy": "J"}


@dataclass(frozen=True)
class PlanResult:
    """A plan with its predicted figures and how it was found.

    ``objective_value`` and ``bound`` are in the minimised score's unit
    (:data:`OBJECTIVE_UNITS`; migration weight included); ``gap`` is their
    relative difference, 0 when proven optimal.
    """

    stages: tuple[Stage, ...]
    evaluation: Evaluation
    solver: str
    optimal: bool
    time_s: float
    objective_value: float
    bound: float | None
    gap: float | None
    nodes_explored: int = 0


def _extra_bound(problem: Problem, relaxer: Relaxer) -> float:
    if problem.objective == "throughput":
        return throughput_bound(problem, relaxer.base_allowed)
    if problem.objective == "energy" and problem.num_units * problem.num_nodes > 0:
        return energy_bound(problem)
    return 0.0


def _current_plan(problem: Problem) -> list[Stage] | None:
    """The current plan, when all its nodes are still there: keeping it is a candidate."""
    if problem.current_stages is None:
        return None
    index = {nid: i for i, nid in enumerate(problem.node_ids)}
    if any(nid not in index for nid, _, _ in problem.current_stages):
        return None
    return [Stage(index[nid], a, b) for nid, a, b in problem.current_stages]


def _migration_causes(problem: Problem) -> list[Cause]:
    owner = problem.current_owner
    cap = problem.max_migration_bytes
    if cap is None or owner is None:
        return []
    lost = [int(u) for u in np.flatnonzero(owner < 0)]
    must = int(problem.param_bytes[lost].sum())
    if must > cap:
        return [
            Cause(
                "migration_cap",
                f"units {lost} were on nodes that are gone: at least {must} bytes must move, the cap is {cap}",
                units=tuple(lost),
            )
        ]
    return [Cause("migration_cap", f"no plan within the migration cap of {cap} bytes satisfies the constraints")]


def plan_optimal(problem: Problem) -> PlanResult:
    """The best plan for ``problem.objective`` under every constraint of DESIGN.md §3.

    Raises :class:`InfeasibleError` with causes when there is none (or none
    was found before the time limit, which the cause then says).
    """
    t0 = time.monotonic()
    relaxer = Relaxer(problem)
    root_cons = Constraints(forced=relaxer.root_forced())
    root = relaxer.solve(root_cons)
    if root is None:
        raise InfeasibleError("no plan satisfies the constraints", diagnose(problem))
    extra = _extra_bound(problem, relaxer)
    search = Search(relaxer, t0 + problem.time_limit_s, extra)
    starts = list(filter(None, [_current_plan(problem)]))
    outcome = search.run(root_cons, root, itertools.chain(starts, heuristic_plans(relaxer, root.stages)))
    elapsed = time.monotonic() - t0
    if outcome.stages is None:
        if outcome.timed_out:
            raise InfeasibleError(
                "no feasible plan found within the time limit",
                [Cause("search_limit", f"searched {outcome.nodes} branches in {elapsed:.3f} s without a feasible plan")],
            )
        causes = _migration_causes(problem) or packing_causes(problem, root.stages) or diagnose(problem)
        raise InfeasibleError("no plan satisfies the constraints", causes)
    broken = violations(problem, outcome.stages)
    if broken:
        # A bug, not bad input: refuse to hand out a plan that breaks a limit.
        raise RuntimeError(f"planner produced an infeasible plan: {broken}")
    ev = evaluate(problem, outcome.stages)
    value = score(problem, ev)
    bound = min(outcome.bound, value)
    gap = 0.0 if outcome.optimal else (value - bound) / abs(value) if value else 0.0
    log.info(
        "planned %d units on %d nodes for %s: %d stages, value %.6g, optimal %s (gap %.3g), %d branches, %.3f s",
        problem.num_units,
        problem.num_nodes,
        problem.objective,
        len(outcome.stages),
        value,
        outcome.optimal,
        gap,
        outcome.nodes,
        elapsed,
    )
    return PlanResult(
        stages=outcome.stages,
        evaluation=ev,
        solver="dp+branch-and-bound",
        optimal=outcome.optimal,
        time_s=elapsed,
        objective_value=value,
        bound=value if outcome.optimal else bound,
        gap=gap,
        nodes_explored=outcome.nodes,
    )
