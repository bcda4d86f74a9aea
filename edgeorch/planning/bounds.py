"""Lower bounds that see every node's total, which the per-stage relaxation cannot.

The relaxation lets a node host many small stages, each within its limits,
and so can be far below the true optimum for throughput and energy when the
best nodes are short of memory. These bounds forget the chain order instead
and keep the totals; the search uses the larger of the two.
"""

from __future__ import annotations

import numpy as np

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
        [_fractional_knapsack(flops[allowed[:, n]], mem[allowed[:, n]], problem.memory_bytes[n]) for n in range(len(fps))]
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
