"""Good feasible plans fast, to give the search an incumbent to prune with.

Two ingredients:

- ``ordered_plan``: with the order in which nodes may appear fixed (each at
  most once, the source also allowed first and last for the U-shape), the
  relaxation's dynamic programme is exact over those plans, and no node but
  the source can exceed its totals; the source's ends are repaired by
  splitting its memory between them.
- ``greedy_cover``: the classic furthest-reach cover for a bottleneck T,
  binary-searched on T. Its node order, fed to ``ordered_plan``, gives strong
  throughput plans where the fixed orders (fastest first...) put the heavy
  head on the wrong nodes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence

import numpy as np

from edgeorch.planning.beam import beam_plan
from edgeorch.planning.cost import evaluate, score
from edgeorch.planning.dp import (
    AdditiveTerms,
    BottleneckTerms,
    SlotGraph,
    earliest_start_budget,
    earliest_start_disallowed,
    min_max,
    min_sum,
)
from edgeorch.planning.problem import Stage, merge_stages
from edgeorch.planning.relax import REPRODUCE_SLACK, Constraints, Relaxed, Relaxer

# Partial plans the beam search keeps per step: wider finds little more (measured on bench clusters).
BEAM_WIDTH = 4
# Moves in a row without improvement before the local search over orders gives up.
LOCAL_SEARCH_PATIENCE = 40


def _slice(terms: AdditiveTerms, slots: np.ndarray) -> AdditiveTerms:
    grid = np.ix_(slots, slots)
    return AdditiveTerms(
        terms.cost_prefix[:, slots],
        terms.hop_fixed[grid],
        terms.hop_per_byte[grid],
        terms.entry_cost[slots],
        terms.exit_cost[slots],
    )


def ordered_plan(
    r: Relaxer, slots: Sequence[int], caps: np.ndarray | None = None, load_caps: np.ndarray | None = None
) -> list[Stage] | None:
    """Best plan whose stages visit ``slots`` (node indices) in that order, each at most once.

    ``caps`` gives the memory of each slot; by default its node's memory.
    ``load_caps`` (s/token per slot) share a node's load between two slots
    of the same node, as ``caps`` share its memory.
    """
    p = r.problem
    slots = np.asarray(slots, dtype=np.int64)
    k_count = len(slots)
    if caps is None:
        caps = p.memory_bytes[slots]
    lo = np.maximum(
        earliest_start_disallowed(r.base_allowed[:, slots]), earliest_start_budget(r.mem_prefix, caps)
    )
    if load_caps is not None:
        lo = np.maximum(lo, earliest_start_budget(r.flops_prefix, load_caps * p.flops_per_s[slots]))
    later = np.triu(np.ones((k_count, k_count), dtype=bool), k=1)
    graph = SlotGraph(
        lo=lo,
        trans_ok=later & r.trans_ok[np.ix_(slots, slots)],
        entry_ok=r.entry_linked[slots],
        exit_ok=r.exit_linked[slots],
        bytes_at=r.bytes_at,
        hop_load=r.hop_load[np.ix_(slots, slots)],
    )
    if p.objective != "throughput":
        path = min_sum(graph, _slice(r.objective_terms, slots))
    else:
        bottleneck = BottleneckTerms(r.load_prefix[:, slots], r.entry_load[slots], r.exit_load[slots])
        first = min_max(graph, bottleneck)
        if first is None:
            return None
        limit = first.value * (1 + REPRODUCE_SLACK)
        graph.lo = np.maximum(lo, earliest_start_budget(r.flops_prefix, limit * p.flops_per_s[slots]))
        graph.hop_limit = limit
        graph.entry_ok = graph.entry_ok & (r.entry_load[slots] <= limit)
        graph.exit_ok = graph.exit_ok & (r.exit_load[slots] <= limit)
        path = min_sum(graph, _slice(r.latency_terms, slots)) or first
    if path is None:
        return None
    return merge_stages([Stage(int(slots[k]), a, b) for k, a, b in path.stages])


def u_shaped(r: Relaxer, order: Sequence[int]) -> list[Stage] | None:
    """``order`` without the source, the source allowed first and last; its memory split if needed."""
    p = r.problem
    src = p.source
    slots = [src, *(n for n in order if n != src), src]
    stages = ordered_plan(r, slots)
    if stages is None or evaluate(p, stages).node_memory_bytes[src] <= p.memory_bytes[src]:
        return stages
    head = stages[0] if stages[0].node == src else None
    used = int(r.mem[head.start : head.end].sum()) if head else 0
    caps = p.memory_bytes[np.array(slots)].copy()
    caps[0], caps[-1] = used, int(p.memory_bytes[src]) - used
    return ordered_plan(r, slots, caps)


def _furthest(r: Relaxer, a: int, prev: int, used: np.ndarray, limit: float) -> tuple[int, int] | None:
    """The unused node that, entered from ``prev`` at boundary a, runs the most units under ``limit``."""
    p = r.problem
    fps = p.flops_per_s
    by_load = np.searchsorted(r.flops_prefix, r.flops_prefix[a] + limit * fps, side="right") - 1
    by_mem = np.searchsorted(r.mem_prefix, r.mem_prefix[a] + p.memory_bytes, side="right") - 1
    reach = np.minimum(np.minimum(by_load, by_mem), r.next_disallowed[a])
    hop_ok = r.trans_ok[prev] & (r.hop_load[prev] * r.bytes_at[a] <= limit)
    if a == 0:
        hop_ok = r.entry_linked & (r.entry_load <= limit)
    reach = np.where(hop_ok & ~used & (reach > a), reach, -1)
    best = int(reach.max())
    if best <= a:
        return None
    # Of the nodes that reach furthest, spend the slowest: keep fast ones for later.
    candidates = np.flatnonzero(reach == best)
    return int(candidates[np.argmin(fps[candidates])]), best


def _furthest_back(r: Relaxer, b: int, nxt: int, used: np.ndarray, limit: float) -> tuple[int, int] | None:
    """Mirror of :func:`_furthest`: the unused node that, leaving to ``nxt`` at b, starts earliest."""
    p = r.problem
    fps = p.flops_per_s
    by_load = np.searchsorted(r.flops_prefix, r.flops_prefix[b] - limit * fps, side="left")
    by_mem = np.searchsorted(r.mem_prefix, r.mem_prefix[b] - p.memory_bytes, side="left")
    start = np.maximum(np.maximum(by_load, by_mem), r.lo_allowed[b])
    if b == p.num_units:
        hop_ok = r.exit_linked & (r.exit_load <= limit)
    else:
        hop_ok = r.trans_ok[:, nxt] & (r.hop_load[:, nxt] * r.bytes_at[b] <= limit)
    start = np.where(hop_ok & ~used & (start < b), start, b)
    best = int(start.min())
    if best >= b:
        return None
    candidates = np.flatnonzero(start == best)
    return int(candidates[np.argmin(fps[candidates])]), best


def greedy_cover(r: Relaxer, limit: float, backward: bool = False) -> list[Stage] | None:
    """Cover the chain stage by stage, each on the unused node reaching furthest; None if stuck.

    Forward starts at the embedding; backward at the head, which matters when
    the head is heavy and only a few (trusted, large) nodes can take it.
    """
    p = r.problem
    used = np.zeros(p.num_nodes, dtype=bool)
    stages: list[Stage] = []
    if not backward:
        a, prev = 0, p.source
        while a < p.num_units:
            step = _furthest(r, a, prev, used, limit)
            if step is None:
                return None
            prev, b = step
            used[prev] = True
            stages.append(Stage(prev, a, b))
            a = b
        ok = r.exit_linked[prev] and r.exit_load[prev] <= limit
        return stages if ok else None
    b, nxt = p.num_units, p.source
    while b > 0:
        step = _furthest_back(r, b, nxt, used, limit)
        if step is None:
            return None
        nxt, a = step
        used[nxt] = True
        stages.append(Stage(nxt, a, b))
        b = a
    ok = r.entry_linked[nxt] and r.entry_load[nxt] <= limit
    return stages[::-1] if ok else None


def greedy_order(
    r: Relaxer, low: float, deadline: float, backward: bool = False, iterations: int = 24
) -> list[int] | None:
    """Node order of the furthest-reach cover at the least bottleneck it manages (bisection)."""
    p = r.problem
    high = max(float(r.flops_prefix[-1] / p.flops_per_s.min()), low * 2, 1e-12)
    low = max(low, high * 1e-9)
    best = greedy_cover(r, high, backward)
    if best is None:
        return None
    for _ in range(iterations):
        if time.monotonic() > deadline:
            break
        mid = (low * high) ** 0.5
        stages = greedy_cover(r, mid, backward)
        if stages is None:
            low = mid
        else:
            high, best = mid, stages
        if high <= low * 1.001:
            break
    order = list(dict.fromkeys(s.node for s in best))
    return order + [n for n in range(p.num_nodes) if n not in order]


def orders(r: Relaxer, hint: Sequence[Stage] | None, bound: float, deadline: float) -> Iterator[list[int]]:
    """Node orders worth trying, cheapest and most robust first."""
    p = r.problem
    nodes = list(range(p.num_nodes))
    if p.objective == "energy":
        yield sorted(nodes, key=lambda n: p.watts[n] / p.flops_per_s[n])
    yield sorted(nodes, key=lambda n: -p.flops_per_s[n])
    # The furthest-reach cover balances the nodes' loads; a good start for every objective.
    for backward in (False, True):
        greedy = greedy_order(r, bound if p.objective == "throughput" else 0.0, deadline, backward)
        if greedy is not None:
            yield greedy
    if hint:
        seen = list(dict.fromkeys(s.node for s in hint))
        yield seen + [n for n in nodes if n not in seen]
    yield nodes


def repaired_plan(
    r: Relaxer, cons: Constraints, plan: Relaxed, keep_largest: bool, deadline: float, rounds: int = 8
) -> list[Stage] | None:
    """Dive from a relaxed plan: a node over its memory keeps one stage and gives up the others.

    Each round forbids the overfull node on the units of its other stages and
    solves the relaxation again, until no node is overfull (or none is left).
    """
    p = r.problem
    for _ in range(rounds):
        if time.monotonic() > deadline:
            return None
        used = np.zeros(p.num_nodes, dtype=np.int64)
        np.add.at(used, plan.assign, r.mem)
        over = used - p.memory_bytes
        n = int(np.argmax(over))
        if over[n] <= 0:
            return list(plan.stages)
        mine = [s for s in plan.stages if s.node == n]
        sizes = [int(r.mem[s.start : s.end].sum()) for s in mine]
        keep = mine[int(np.argmax(sizes))] if keep_largest else mine[0]
        pinned = {u for u, m in cons.forced if m == n}
        bans = {(u, n) for s in mine if s != keep for u in range(s.start, s.end) if u not in pinned}
        if not bans:
            return None
        cons = Constraints(
            cons.forced, cons.forbidden | bans, cons.forbidden_hops, cons.must_move, cons.budgets
        )
        nxt = r.solve(cons)
        if nxt is None:
            return None
        plan = nxt
    return None


def _order_value(r: Relaxer, stages: list[Stage] | None) -> float:
    if stages is None:
        return float("inf")
    ev = evaluate(r.problem, stages)
    if np.any(ev.node_memory_bytes > r.problem.memory_bytes):
        return float("inf")
    return score(r.problem, ev)


def quick_plans(r: Relaxer) -> Iterator[list[Stage]]:
    """One cheap, usually feasible plan (fastest nodes first, as is and U-shaped)."""
    p = r.problem
    order = sorted(range(p.num_nodes), key=lambda n: -p.flops_per_s[n])
    for build in (ordered_plan, u_shaped):
        stages = build(r, order)
        if stages is not None:
            yield stages


def heuristic_plans(
    r: Relaxer,
    cons: Constraints,
    root: Relaxed | None,
    bound: float,
    soft: float,
    hard: float,
    prices: np.ndarray | None = None,
) -> Iterator[list[Stage]]:
    """Candidate plans: fixed orders, repaired relaxed plans, then local search over orders.

    Runs until ``soft``, or until ``hard`` while it has no feasible plan yet.
    The caller checks every candidate in full before keeping it. The local
    search moves one node to another place in the best order found and keeps
    the move when the ordered plan is no worse (seeded, so deterministic).
    """
    best_order, best_value = None, float("inf")  # of the ordered plans, for the local search
    feasible = False

    def out_of_time() -> bool:
        return time.monotonic() > (soft if feasible else hard)

    hint = root.stages if root is not None else None
    if root is not None and r.problem.objective != "throughput":
        # First, as it finds the best plans when nodes hold a layer or two each.
        for stages in _relaxation_guided(r, cons, root, soft, prices):
            feasible = feasible or np.isfinite(_order_value(r, stages))
            yield stages
    for order in orders(r, hint, bound, hard):
        for build in (ordered_plan, u_shaped):
            if out_of_time():
                return
            stages = build(r, order)
            value = _order_value(r, stages)
            feasible = feasible or np.isfinite(value)
            if value < best_value and build is ordered_plan:
                best_order, best_value = order, value
            if stages is not None:
                yield stages
    if best_order is not None:
        yield from local_search(r, best_order, best_value, out_of_time)


def _relaxation_guided(
    r: Relaxer, cons: Constraints, root: Relaxed, deadline: float, prices: np.ndarray | None
) -> Iterator[list[Stage]]:
    """The (priced) beam search, then repair dives from the (priced) relaxed plan."""
    stages = beam_plan(r, cons, BEAM_WIDTH, deadline, prices)
    if stages is not None:
        yield stages
    start = r.solve(cons, None, prices) if prices is not None else root
    for keep_largest in (True, False):
        stages = repaired_plan(r, cons, start or root, keep_largest, deadline)
        if stages is not None:
            yield stages


def local_search(r: Relaxer, order: list[int], value: float, out_of_time) -> Iterator[list[Stage]]:
    """Move one node elsewhere in the order; keep the move when the ordered plan is no worse."""
    rng = random.Random(0)
    stall = 0
    while not out_of_time() and stall < LOCAL_SEARCH_PATIENCE:
        trial = list(order)
        trial.insert(rng.randrange(len(trial)), trial.pop(rng.randrange(len(trial))))
        stages = ordered_plan(r, trial)
        trial_value = _order_value(r, stages)
        stall = 0 if trial_value < value * (1 - 1e-9) else stall + 1
        if trial_value <= value:
            order, value = trial, trial_value
            yield stages
