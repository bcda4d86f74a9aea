"""Beam search over partial plans, guided by the relaxation's cost-to-go.

When nodes hold only a layer or two each (many small edge nodes, a big
model), the relaxation reuses the fastest nodes for stage after stage and
its plan is useless as it stands. This search builds plans left to right and
tracks every node's memory exactly, so whatever it returns is feasible; it
ranks partial plans by their exact cost so far plus the relaxation's lower
bound on the rest (an admissible estimate), and keeps the best few at each
step. Additive objectives only (latency, energy).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from edgeorch.planning.dp import AdditiveTerms, SlotGraph
from edgeorch.planning.problem import Stage, merge_stages
from edgeorch.planning.relax import Constraints, Relaxer

INF = np.inf


def cost_to_go(graph: SlotGraph, terms: AdditiveTerms) -> np.ndarray:
    """(U+1, K): least relaxed cost to finish once a stage on slot k has ended at boundary b.

    The mirror image of :func:`edgeorch.planning.dp.min_sum`, run from the exit
    back to the entry; row U is the exit hop.
    """
    u_count = graph.num_units
    cost = terms.cost_prefix
    k_count = cost.shape[1]
    leave = np.full((u_count + 1, k_count), INF)
    leave[u_count] = np.where(graph.exit_ok, terms.exit_cost, INF)
    for a in range(u_count - 1, 0, -1):
        # Stages [a, b) on k for every b > a the stage may end at.
        ends = np.arange(a + 1, u_count + 1)
        x = cost[a + 1 :] + leave[a + 1 :] - cost[a][None, :]
        x[graph.lo[ends] > a] = INF
        start = x.min(axis=0)
        hop = np.where(graph.blocked(a), INF, terms.hop_fixed + terms.hop_per_byte * graph.bytes_at[a])
        leave[a] = (hop + start[None, :]).min(axis=1)
    return leave


@dataclass
class _Partial:
    cost: float
    boundary: int
    last: int
    used: np.ndarray
    stages: list[Stage]


def beam_plan(
    r: Relaxer, cons: Constraints, width: int, deadline: float, prices: np.ndarray | None = None
) -> list[Stage] | None:
    """A feasible plan (memory totals kept exactly), or None if the beam dies out or time runs out.

    With Lagrangian ``prices`` the ranking charges each byte of memory its
    node's price, so scarce fast nodes are not spent early on.
    """
    p = r.problem
    if p.objective == "throughput":
        return None
    built = r.graph(cons, None)
    if built is None:
        return None
    graph, _, _ = built
    terms = r.objective_terms
    if prices is not None:
        terms = replace(terms, cost_prefix=terms.cost_prefix + r.mem_prefix[:, None] * prices[None, :])
    leave = cost_to_go(graph, terms)
    beam = [_Partial(0.0, 0, p.source, np.zeros(p.num_nodes, dtype=np.int64), [])]
    best: tuple[float, list[Stage]] | None = None
    while beam:
        if time.monotonic() > deadline:
            return None
        candidates = [c for part in beam for c in _extend(r, graph, terms, leave, part, width)]
        candidates.sort(key=lambda c: c[0])
        beam = []
        for estimate, part in candidates:
            if part.boundary == p.num_units:
                done = part.cost + leave[p.num_units, part.last]
                if best is None or done < best[0]:
                    best = (done, part.stages)
            elif len(beam) < width and (best is None or estimate < best[0]):
                beam.append(part)
    return merge_stages(best[1]) if best else None


def _extend(
    r: Relaxer, graph: SlotGraph, terms: AdditiveTerms, leave: np.ndarray, part: _Partial, width: int
) -> list[tuple[float, _Partial]]:
    """The ``width`` most promising next stages of a partial plan, as (estimate, new partial plan)."""
    p = r.problem
    a, m = part.boundary, part.last
    if a == 0:
        hop = np.where(graph.entry_ok, terms.entry_cost, INF)
    else:
        hop = np.where(
            graph.blocked(a)[m], INF, terms.hop_fixed[m] + terms.hop_per_byte[m] * graph.bytes_at[a]
        )
    room = p.memory_bytes - part.used
    by_mem = np.searchsorted(r.mem_prefix, r.mem_prefix[a] + room, side="right") - 1
    reach = np.minimum(by_mem, _allowed_reach(graph, a))
    ends = np.arange(a + 1, p.num_units + 1)
    cost = terms.cost_prefix
    # est[b, n]: cost so far + hop into n + stage [a, b) on n + least cost after it.
    est = part.cost + hop[None, :] + (cost[ends] - cost[a][None, :]) + leave[ends]
    est[ends[:, None] > reach[None, :]] = INF
    flat = est.ravel()
    k = min(width, int(np.isfinite(flat).sum()))
    if k == 0:
        return []
    picks = np.argpartition(flat, k - 1)[:k]
    out = []
    for i in picks:
        bi, n = divmod(int(i), est.shape[1])
        b = int(ends[bi])
        used = part.used.copy()
        used[n] += int(r.mem_prefix[b] - r.mem_prefix[a])
        spent = part.cost + float(hop[n]) + float(cost[b, n] - cost[a, n])
        out.append((float(flat[i]), _Partial(spent, b, n, used, [*part.stages, Stage(n, a, b)])))
    return out


def _allowed_reach(graph: SlotGraph, a: int) -> np.ndarray:
    """Largest end b per slot such that a stage [a, b) passes the graph's per-stage checks."""
    ok = graph.lo[a + 1 :] <= a  # (U - a, K): may a stage starting at a end at each b?
    # Per-stage checks are monotone in b, so the last allowed b is the count of leading Trues.
    first_bad = np.where(ok.all(axis=0), ok.shape[0], np.argmin(ok, axis=0))
    return a + first_bad
