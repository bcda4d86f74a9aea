"""Lower bounds that see every node's total, which the per-stage relaxation cannot.

The relaxation lets a node host many small stages, each within its limits,
and so can be far below the true optimum for throughput and energy when the
best nodes are short of memory. These bounds forget the chain order instead
and keep the totals; the search uses the largest. They are the cheap ones,
and the fallback when units are too varied for the exact packing programme
of :mod:`edgeorch.planning.packing`.
"""

from __future__ import annotations

import numpy as np

from edgeorch.planning.packing import unit_classes
from edgeorch.planning.problem import Problem


def _fractional_knapsack(value: np.ndarray, weight: np.ndarray, capacity: float) -> float:
    """Most value that fits in ``capacity`` when items may be split (an upper bound)."""
    free = weight <= 0
    total = float(value[free].sum())
    v, w = value[~free], weight[~free].astype(np.float64)
    order = np.argsort(-(v / w), kind="stable")
    room = float(capacity)
    for i in order:
        if room <= 0:
            break
        take = min(1.0, room / w[i])
        total += take * v[i]
        room -= take * w[i]
    return total


def throughput_bound(problem: Problem, allowed: np.ndarray) -> float:
    """Least possible bottleneck (s/token) from node compute alone, totals kept.

    Node n can hold at most ``F_n`` flops/token of the units it may run (a
    fractional knapsack on its memory) and, at bottleneck T, at most
    ``T·flops_per_s(n)``. All units must go somewhere, so
    ``Σ_n min(T·fps_n, F_n) >= total flops``; the least such T is a bound, as
    is every unit's fastest allowed load. Returns inf when even that cannot
    hold all the flops (then no plan exists).
    """
    flops = problem.flops_per_token
    mem = problem.unit_memory_bytes
    fps = problem.flops_per_s
    total = float(flops.sum())
    if total <= 0:
        return 0.0
    per_unit = np.where(allowed, flops[:, None] / fps[None, :], np.inf).min(axis=1)
    unit_bound = float(per_unit.max())
    cap_flops = np.array(
        [
            _fractional_knapsack(flops[allowed[:, n]], mem[allowed[:, n]], problem.memory_bytes[n])
            for n in range(len(fps))
        ]
    )
    if cap_flops.sum() < total * (1 - 1e-12):
        return float("inf")
    # Σ_n min(T·fps_n, cap_n) is piecewise linear in T with a kink at cap_n/fps_n.
    kinks = cap_flops / fps
    order = np.argsort(kinks)
    saturated = 0.0
    slope = float(fps.sum())
    for i in order:
        t = (total - saturated) / slope if slope > 0 else np.inf
        if t <= kinks[i]:
            return max(unit_bound, t)
        saturated += cap_flops[i]
        slope -= fps[i]
    return max(unit_bound, float(kinks[order[-1]]))


def _unit_classes(
    problem: Problem, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Units grouped by identical (flops, memory, allowed nodes): count, flops, memory, allowed row."""
    _, reps, counts = unit_classes(problem, allowed)
    return counts, problem.flops_per_token[reps], problem.unit_memory_bytes[reps], allowed[reps]


def _combos(counts: np.ndarray, max_combos: int) -> np.ndarray | None:
    """Every count vector per class (C, classes), or None when there are too many."""
    if np.prod(counts + 1.0) > max_combos:
        return None
    grids = np.meshgrid(*[np.arange(c + 1) for c in counts], indexing="ij")
    return np.stack([g.ravel() for g in grids], axis=1)


def packable_memory(problem: Problem, allowed: np.ndarray, max_combos: int = 4096) -> np.ndarray | None:
    """Per node, the most unit memory it can hold in whole units (None when units are too varied).

    A node of 3 GB holds one 1.7 GB layer, not 1.7 of them: if these figures
    do not add up to the model, no plan exists, however the chain is cut.
    """
    counts, _, mem, allow = _unit_classes(problem, allowed)
    combo = _combos(counts, max_combos)
    if combo is None:
        return None
    combo_mem = combo @ mem.astype(np.float64)
    fits = combo_mem[None, :] <= problem.memory_bytes[:, None]
    fits &= ((combo[None, :, :] == 0) | allow.T[:, None, :]).all(axis=2)
    return np.where(fits, combo_mem[None, :], 0.0).max(axis=1)


def whole_unit_throughput_bound(problem: Problem, allowed: np.ndarray, max_combos: int = 4096) -> float:
    """Like :func:`throughput_bound` but with whole units: what a node can take is a set of units.

    Units fall into few classes (embedding, identical layers, head), so every
    count vector per class can be listed; node n can then carry at most the
    most flops of a count vector that fits its memory and stays under T. A
    GPU that fits 3.9 layers carries 3, which the fractional bound misses.
    Falls back to the fractional bound when the classes are too many.
    """
    fractional = throughput_bound(problem, allowed)
    counts, flops, mem, allow = _unit_classes(problem, allowed)
    combo = _combos(counts, max_combos)
    if combo is None or not np.isfinite(fractional):
        return fractional
    combo_flops = combo @ flops
    combo_mem = combo @ mem.astype(np.float64)
    # (N, C): may node n take this count vector at all (memory, privacy)?
    fits = combo_mem[None, :] <= problem.memory_bytes[:, None]
    fits &= ((combo[None, :, :] == 0) | allow.T[:, None, :]).all(axis=2)
    load = combo_flops[None, :] / problem.flops_per_s[:, None]
    total = float(problem.flops_per_token.sum())

    def carried(t: float) -> float:
        return float(np.where(fits & (load <= t), combo_flops[None, :], 0.0).max(axis=1).sum())

    candidates = np.unique(load[fits & (load >= fractional)])
    lo, hi = 0, len(candidates) - 1
    if hi < 0 or carried(candidates[hi]) < total * (1 - 1e-12):
        return fractional
    while lo < hi:
        mid = (lo + hi) // 2
        if carried(candidates[mid]) >= total * (1 - 1e-12):
            hi = mid
        else:
            lo = mid + 1
    return max(fractional, float(candidates[lo]))


def energy_bound(problem: Problem) -> float:
    """Least possible energy (J) with memory totals kept and chain order, links, trust ignored.

    A transportation problem: bytes of each unit to nodes, cost per byte
    ``(flops_u / mem_u)·(P+G)·watts_n / fps_n``. That cost is a product of a
    unit factor and a node factor, so filling the cheapest nodes with the
    densest units first is optimal for it.
    """
    tokens = problem.workload.tokens
    flops = problem.flops_per_token
    mem = problem.unit_memory_bytes.astype(np.float64)
    node_cost = tokens * problem.watts / problem.flops_per_s
    cheapest = float(node_cost.min())
    free = mem <= 0
    energy = float(flops[free].sum()) * cheapest
    units = np.flatnonzero(~free)
    units = units[np.argsort(-(flops[units] / mem[units]), kind="stable")]
    nodes = np.argsort(node_cost, kind="stable")
    room = problem.memory_bytes.astype(np.float64)[nodes]
    j = 0
    for u in units:
        need = mem[u]
        while need > 0:
            if j >= len(nodes):
                return float("inf")
            take = min(need, room[j])
            energy += take / mem[u] * flops[u] * node_cost[nodes[j]]
            need -= take
            room[j] -= take
            if room[j] <= 0:
                j += 1
    return energy
