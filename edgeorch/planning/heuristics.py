"""Good feasible plans fast, to give the search an incumbent to prune with.

The main one visits nodes in a fixed order, each at most once, with the source
allowed both first and last (the U-shape). With an order fixed, the same
dynamic programme as the relaxation is exact over those plans, and no node
can exceed its totals, except the source's two ends, which are repaired by
splitting its memory between them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from edgeorch.planning.cost import evaluate
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
from edgeorch.planning.relax import _REPRODUCE, Relaxer


def _slice(terms: AdditiveTerms, slots: np.ndarray) -> AdditiveTerms:
    grid = np.ix_(slots, slots)
    return AdditiveTerms(
        terms.cost_prefix[:, slots],
        terms.hop_fixed[grid],
        terms.hop_per_byte[grid],
        terms.entry_cost[slots],
        terms.exit_cost[slots],
    )


def ordered_plan(r: Relaxer, order: Sequence[int], caps: np.ndarray | None = None) -> list[Stage] | None:
    """Best plan visiting ``order`` (non-source nodes) in sequence, source first and last.

    ``caps`` gives the memory of each slot (source prefix, order..., source
    suffix); by default every slot has its node's memory.
    """
    p = r.problem
    src = p.source
    slots = np.array([src, *order, src], dtype=np.int64)
    k_count = len(slots)
    if caps is None:
        caps = p.memory_bytes[slots]
    lo = np.maximum(earliest_start_disallowed(r.base_allowed[:, slots]), earliest_start_budget(r.mem_prefix, caps))
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
        limit = first.value * (1 + _REPRODUCE)
        graph.lo = np.maximum(lo, earliest_start_budget(r.flops_prefix, limit * p.flops_per_s[slots]))
        graph.hop_limit = limit
        graph.entry_ok = graph.entry_ok & (r.entry_load[slots] <= limit)
        graph.exit_ok = graph.exit_ok & (r.exit_load[slots] <= limit)
        path = min_sum(graph, _slice(r.latency_terms, slots)) or first
    if path is None:
        return None
    return merge_stages([Stage(int(slots[k]), a, b) for k, a, b in path.stages])


def _source_split(r: Relaxer, order: Sequence[int], stages: list[Stage]) -> list[Stage] | None:
    """Re-plan with the source's memory split between its prefix and suffix as found."""
    p = r.problem
    src = p.source
    head = stages[0] if stages[0].node == src else None
    used = int(r.mem[head.start : head.end].sum()) if head else 0
    caps = p.memory_bytes[np.array([src, *order, src])].copy()
    caps[0] = used
    caps[-1] = int(p.memory_bytes[src]) - used
    return ordered_plan(r, order, caps)


def orders(r: Relaxer, hint: Sequence[Stage] | None) -> Iterator[list[int]]:
    """Node orders worth trying: fastest first, the relaxed plan's order, request order."""
    p = r.problem
    others = [n for n in range(p.num_nodes) if n != p.source]
    by_speed = sorted(others, key=lambda n: -p.flops_per_s[n])
    yield by_speed
    if hint:
        seen = list(dict.fromkeys(s.node for s in hint if s.node != p.source))
        yield seen + [n for n in by_speed if n not in seen]
    yield others


def heuristic_plans(r: Relaxer, hint: Sequence[Stage] | None) -> Iterator[list[Stage]]:
    """Feasible-by-construction candidates (the caller still checks them in full)."""
    p = r.problem
    for order in orders(r, hint):
        stages = ordered_plan(r, order)
        if stages is None:
            continue
        ev = evaluate(p, stages)
        if ev.node_memory_bytes[p.source] > p.memory_bytes[p.source]:
            repaired = _source_split(r, order, stages)
            if repaired is None:
                continue
            stages = repaired
        yield stages
