"""The optimal planner: packing, relaxation, heuristics, branch and bound, final check.

0. Throughput and energy: pack whole units onto nodes with the chain order
   forgotten (:mod:`edgeorch.planning.packing`): a lower bound, and a packing
   that attains it. Ordered along the links
   (:mod:`edgeorch.planning.realise`), that packing usually gives a plan of
   the same value: proven optimal, done (solver ``packing+ordered-dp``).
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

import logging
import time
from dataclasses import dataclass

import numpy as np

from edgeorch.planning.bounds import energy_bound, whole_unit_throughput_bound
from edgeorch.planning.cost import Evaluation, evaluate, score, violations
from edgeorch.planning.diagnose import diagnose, whole_unit_causes
from edgeorch.planning.errors import Cause, InfeasibleError, UnsupportedRequestError
from edgeorch.planning.heuristics import heuristic_plans, local_search, ordered_plan, quick_plans, u_shaped
from edgeorch.planning.latency_lp import latency_lp, lp_order
from edgeorch.planning.packing import HopLoads, build_packer, packed_energy, packed_throughput
from edgeorch.planning.problem import Problem, Stage
from edgeorch.planning.realise import realised_plans
from edgeorch.planning.relax import Constraints, Relaxer
from edgeorch.planning.search import Search, SearchOutcome

log = logging.getLogger(__name__)

OBJECTIVE_UNITS = {"latency": "s", "throughput": "s/token", "energy": "J"}
# Shares of the time limit: the Lagrangian prices may use this much of what is
# left when they start, and heuristics run until this share has passed (longer
# only while they have no feasible plan); the exact search gets the rest.
PRICE_SHARE = 0.3
HEURISTIC_SHARE = 0.6
# Latency on this many nodes or more gets the LP bound and its plan (latency_lp.py). Below,
# the exact search alone proves optimality within its limit (bench/planner.py, 4-16 nodes).
LP_MIN_NODES = 24
# Up to this many nodes the LP is solved twice, over the nodes that can hold a unit and over
# every node: the two optima lead to different node orders, and neither order is always the
# better one (200 x 80, bench/planner.py seeds 0-1: the second's plans 2-3 % shorter). Past it
# the second LP does not fit the limit (1,000 nodes). Each LP takes ~0.1 s at 200 nodes.
BOTH_LPS_MAX_NODES = 400
# The LP may end at this share of the time limit; the order search at the next.
LP_SHARE = 0.8
ORDER_SHARE = 0.88
# Local search around the LP's plan stops here, leaving time to check and report the plan.
FINISH_SHARE = 0.9
# Past this many (unit boundary, node, node) cells the per-stage programme is too slow to
# repeat within a limit of a second or two (200 nodes x 82 units is 3.3 M): the LP's plan is
# improved by local search over its order instead of the exact search.
DP_CELLS_MAX = 1_000_000


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


@dataclass(frozen=True)
class PackingHint:
    """The packing that attains the packing bound: a count vector per node, and each unit's class."""

    take: np.ndarray
    unit_class: np.ndarray
    limit: float | None


def _extra_bound(problem: Problem, relaxer: Relaxer) -> tuple[float, PackingHint | None]:
    """A lower bound that sees node totals (the relaxation does not), and the packing behind it."""
    allowed = relaxer.base_allowed
    if problem.objective == "latency":
        return 0.0, None
    packer = build_packer(problem, allowed)
    if problem.objective == "throughput":
        low = whole_unit_throughput_bound(problem, allowed)
        if packer is None:
            return low, None
        packed = packed_throughput(problem, packer, low, hops=_hop_loads(relaxer))
        limit: float | None = packed.value
    else:
        low = energy_bound(problem)
        if packer is None:
            return low, None
        packed = packed_energy(problem, packer)
        limit = None
    hint = PackingHint(packed.take, packer.unit_class, limit) if packed.take is not None else None
    return max(low, packed.value), hint


def _hop_loads(relaxer: Relaxer) -> HopLoads:
    """The hops' per-token loads for the throughput packing (inner hops with the fewest bytes)."""
    r = relaxer
    u_count = r.problem.num_units
    inner = np.full(r.trans_ok.shape, np.inf)
    if u_count > 1:
        inner[r.trans_ok] = r.hop_load[r.trans_ok] * float(r.bytes_at[1:u_count].min())
    return HopLoads(
        inner, np.where(r.entry_linked, r.entry_load, np.inf), np.where(r.exit_linked, r.exit_load, np.inf)
    )


def _current_plan(problem: Problem) -> list[Stage] | None:
    """The current plan, when all its nodes are still there: keeping it is a candidate."""
    if problem.current_stages is None:
        return None
    index = {nid: i for i, nid in enumerate(problem.node_ids)}
    if any(nid not in index for nid, _, _ in problem.current_stages):
        return None
    return [Stage(index[nid], a, b) for nid, a, b in problem.current_stages]


def _realise(search: Search, hint: PackingHint | None, deadline: float) -> bool:
    """Offer the current plan and plans realising the packing; True once one attains the bound.

    Such a plan is optimal (the bound holds for every plan), so nothing else
    need run: not even the relaxation.
    """
    current = _current_plan(search.p)
    if current is not None:
        search.offer(current)
    if search.pruned(search.extra_bound):
        return True
    if hint is None:
        return False
    for stages in realised_plans(search.r, hint.take, hint.unit_class, hint.limit, deadline):
        search.offer(stages)
        if search.pruned(search.extra_bound):
            return True
    return False


def _latency_lp(search: Search, t0: float, limit: float) -> list[int] | None:
    """For latency on many nodes: raise the search's bound to the LP's, offer the plan its order gives.

    Returns the order (None where the LP does not apply or did not finish in its share of the limit).
    """
    p, r = search.p, search.r
    if p.objective != "latency" or p.num_nodes < LP_MIN_NODES:
        return None
    best: tuple[float, list[int]] | None = None
    for candidates_only in (True, False) if p.num_nodes <= BOTH_LPS_MAX_NODES else (True,):
        lp = latency_lp(p, r.base_allowed, t0 + LP_SHARE * limit, candidates_only)
        if lp is None:
            continue
        search.extra_bound = max(search.extra_bound, lp.bound)
        order = lp_order(lp, t0 + ORDER_SHARE * limit)
        if not order:
            continue
        # The LP's nodes alone, then every other node after them (fastest first) should they not hold it.
        rest = sorted(set(range(p.num_nodes)) - set(order), key=lambda n: -p.flops_per_s[n])
        for slots in (order, order + rest):
            # As ordered, and with the source first and last (the LP may put both ends there).
            before = search.best_value
            for stages in (ordered_plan(r, slots), u_shaped(r, slots)):
                if stages is not None:
                    search.offer(stages)
            if np.isfinite(search.best_value):
                # The order to improve on: the one whose plan is the best so far.
                if best is None or search.best_value < before:
                    best = (search.best_value, slots)
                break
    return best[1] if best is not None else None


def _fastest_first(search: Search) -> None:
    """When the LP gave nothing: the fastest nodes that hold a unit, 1.5 (then 2) times the model."""
    p = search.p
    order = [int(n) for n in np.flatnonzero(search.r.base_allowed.any(axis=0))]
    order.sort(key=lambda n: -p.flops_per_s[n])
    held = np.cumsum(p.memory_bytes[order])
    model = int(p.unit_memory_bytes.sum())
    for share in (1.5, 2.0):
        stages = ordered_plan(search.r, order[: int(np.searchsorted(held, share * model)) + 1])
        if stages is not None:
            search.offer(stages)
        if np.isfinite(search.best_value):
            return


def _lp_result(search: Search, t0: float) -> PlanResult:
    """The best plan found around the LP, with the LP's bound (proven optimal if it attains it)."""
    proven = search.pruned(search.extra_bound)
    outcome = SearchOutcome(search.best_stages, search.best_value, search.extra_bound, proven, 0, not proven)
    return _result(search.p, outcome, time.monotonic() - t0, solver="lp+ordered-dp")


def _improve(search: Search, order: list[int], deadline: float) -> None:
    """Local search over the order until the deadline or a plan attains the bound."""
    value = search.best_value

    def out_of_time() -> bool:
        return time.monotonic() > deadline or search.pruned(search.extra_bound)

    for stages in local_search(search.r, order, value, out_of_time):
        search.offer(stages)


def _seek(search: Search, cons: Constraints, root, t0: float, limit: float) -> None:
    """Incumbents and prices before the exact search, cheapest first, until one is proven optimal.

    The quick plan gives the price search its target; the prices then both
    raise the lower bound and steer the heuristics away from overfull nodes.
    """
    relaxer = search.r

    def proven() -> bool:
        return search.pruned(max(root.value, search.extra_bound, search.price_bound))

    for stages in quick_plans(relaxer):
        search.offer(stages)
    if proven():
        return
    search.find_prices(cons, root, share=PRICE_SHARE)
    if proven():
        return
    soft, hard = t0 + HEURISTIC_SHARE * limit, t0 + limit
    for stages in heuristic_plans(relaxer, cons, root, search.extra_bound, soft, hard, search.prices):
        search.offer(stages)
        if proven() or time.monotonic() > (soft if np.isfinite(search.best_value) else hard):
            break


def plan_optimal(problem: Problem) -> PlanResult:
    """The best plan for ``problem.objective`` under every constraint of DESIGN.md §3.

    Raises :class:`InfeasibleError` with causes when there is none (or none
    was found before the time limit, which the cause then says).
    """
    if problem.objective == "throughput" and problem.migration_weight > 0:
        raise UnsupportedRequestError("migration_weight has no unit for throughput; use max_migration_bytes")
    t0 = time.monotonic()
    relaxer = Relaxer(problem)
    limit = problem.time_limit_s
    extra, hint = _extra_bound(problem, relaxer)
    search = Search(relaxer, t0 + limit, extra)
    if _realise(search, hint, t0 + limit):
        outcome = SearchOutcome(search.best_stages, search.best_value, extra, True, 0, False)
        return _result(problem, outcome, time.monotonic() - t0, solver="packing+ordered-dp")
    order = _latency_lp(search, t0, limit)
    big = (problem.num_units + 1) * problem.num_nodes**2 > DP_CELLS_MAX
    if order is not None and search.pruned(search.extra_bound):
        return _lp_result(search, t0)
    if problem.objective == "latency" and big:
        if order is None:  # no LP in time: a quick plan, no search (each step costs too much here)
            _fastest_first(search)
        elif np.isfinite(search.best_value):
            _improve(search, order, t0 + FINISH_SHARE * limit)
        if np.isfinite(search.best_value):
            return _lp_result(search, t0)
    root_cons = Constraints(forced=relaxer.root_forced())
    root = relaxer.solve(root_cons)
    if root is None:
        raise InfeasibleError("no plan satisfies the constraints", diagnose(problem))
    # The relaxation may reuse nodes beyond their memory; when whole units cannot
    # fill the model even without any chain order, say so now instead of searching.
    packing = whole_unit_causes(problem, relaxer.base_allowed)
    if packing:
        raise InfeasibleError("no plan satisfies the constraints", packing)
    if not search.root_is_enough(root_cons, root):
        _seek(search, root_cons, root, t0, limit)
    outcome = search.run(root_cons, root)
    elapsed = time.monotonic() - t0
    if outcome.stages is None:
        raise _no_plan(problem, outcome, root, elapsed)
    return _result(problem, outcome, elapsed)


def _no_plan(problem: Problem, outcome: SearchOutcome, root, elapsed: float) -> InfeasibleError:
    """The error for a search that ended without a plan: proven infeasible, or out of time."""
    if outcome.timed_out:
        text = f"searched {outcome.nodes} branches in {elapsed:.3f} s without a feasible plan"
        return InfeasibleError("no feasible plan found within the time limit", [Cause("search_limit", text)])
    return InfeasibleError("no plan satisfies the constraints", diagnose(problem, root.stages))


def _result(
    problem: Problem, outcome: SearchOutcome, elapsed: float, solver: str = "dp+branch-and-bound"
) -> PlanResult:
    """The found plan, checked once more against every constraint, with its figures."""
    broken = violations(problem, outcome.stages)
    if broken:
        # A bug, not bad input: refuse to hand out a plan that breaks a limit.
        raise RuntimeError(f"planner produced an infeasible plan: {broken}")
    ev = evaluate(problem, outcome.stages)
    value = score(problem, ev)
    bound = value if outcome.optimal else min(outcome.bound, value)
    gap = (value - bound) / abs(value) if value else 0.0
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
        solver=solver,
        optimal=bool(outcome.optimal),
        time_s=elapsed,
        objective_value=value,
        bound=bound,
        gap=gap,
        nodes_explored=outcome.nodes,
    )
