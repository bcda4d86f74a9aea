"""A linear-programming lower bound for the latency objective, and the node orders it suggests.

The per-stage relaxation (:mod:`edgeorch.planning.relax`) lets a plan reuse
the two best-linked nodes again and again; its memory prices only partly undo
that, and on a fleet where each node holds a layer or two (200 nodes, 80
layers) it left gaps of 30-80 % within a second. This bound counts what every
plan does instead of how it orders units:

- ``x[t, n]``: units of group t on node n. A *group* is a set of
  interchangeable units (same memory, flops and privacy rule: a decoder's
  layers), so a Llama profile has three groups whatever its depth.
- ``z[n]``: stages on node n; ``f[m, n]``: hops from m to n; ``e[n]``,
  ``q[n]``: whether the first (last) stage is on n.

and keeps what holds for every plan: each group covered; a node's memory in
total; per node, hops in = hops out = stages (with the entry and exit); a
stage holds at least one unit and at most what fits (``x[t, n] <=
floor(memory / unit) * z[n]``). Costs are exact for compute, entry and exit;
a hop between stages costs at least its round trips plus the fewest bytes any
inner boundary sends. Migration costs (never negative) are left out. So the
LP optimum is a lower bound on every feasible plan's score; what it relaxes is
the integrality and that hops form one path (subtours are allowed), the
assignment bound of a travelling-salesman problem, which is tight on
random-like link costs.

The arcs are sparse: per node only its ``IN_ARCS`` cheapest incoming hops,
plus one arc from a free hub at the cost of the cheapest hop left out (a
hop left out is replaced by node→hub (0) + hub→node, which costs no more).
That keeps 1,000 nodes at about 20,000 arcs instead of a million.

The solution's hops, patched into one path and improved by moving segments
(or-opt), give the node order from which
:func:`~edgeorch.planning.heuristics.ordered_plan` builds a plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

# Imported here, not at the first plan: it takes a few tenths of a second (seconds under load).
from scipy.optimize import linprog
from scipy.sparse import coo_matrix

from edgeorch.planning.problem import Problem

# Incoming hops per node the LP keeps (the rest go through the hub).
IN_ARCS = 12
# Unit groups beyond which the LP is not built (each adds a column per node).
MAX_GROUPS = 8
# The cost of a missing hop in the order search, in seconds.
NO_LINK_S = 1e9
# The LP solver's optimum is exact to about 1e-9 relative; stay below it.
BOUND_SLACK = 1e-7


@dataclass(frozen=True)
class LatencyLp:
    """The LP's optimum (a lower bound), its stages per node and its hops.

    Every array is over ``nodes`` (the problem's nodes that can hold a unit): index i is ``nodes[i]``.
    """

    bound: float
    stages: np.ndarray  # (N,) z
    units: np.ndarray  # (G, N) x: units of each group per node
    groups: list[np.ndarray]
    arcs: list[tuple[int, int, float]]  # (src, dst, flow) of hops between nodes, flow > 0
    entry: np.ndarray  # (N,) e
    hop: np.ndarray  # (N, N) the hop costs the LP charged (inf: no link)
    entry_cost: np.ndarray
    exit_cost: np.ndarray
    time_s: float
    nodes: np.ndarray


def unit_groups(problem: Problem, allowed: np.ndarray) -> list[np.ndarray] | None:
    """Interchangeable units (same memory, flops and allowed nodes), or None if too many groups."""
    mem, flops = problem.unit_memory_bytes, problem.flops_per_token
    groups: dict[tuple, list[int]] = {}
    for u in range(problem.num_units):
        groups.setdefault((int(mem[u]), float(flops[u]), allowed[u].tobytes()), []).append(u)
    if len(groups) > MAX_GROUPS:
        return None
    return [np.array(units) for units in groups.values()]


def hop_costs(problem: Problem, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Among ``nodes``: the least cost of a hop between stages, and each one's entry and exit hop."""
    p, w = problem, problem.workload
    u_count = p.num_units
    grid = np.ix_(nodes, nodes)
    link = p.has_link[grid] & ~np.eye(len(nodes), dtype=bool)
    bw = np.where(p.has_link[grid], p.bandwidth_bytes_per_s[grid], 1.0)
    least = float(p.out_bytes_per_token[: u_count - 1].min()) if u_count > 1 else 0.0
    hop = np.where(link, (1 + w.generated_tokens) * p.rtt_s[grid] / 2 + w.tokens * least / bw, np.inf)
    src = p.source
    is_src = nodes == src

    def one_way(linked, rtt, bandwidth, nbytes):
        cost = (1 + w.generated_tokens) * rtt / 2 + w.tokens * nbytes / np.where(linked, bandwidth, 1.0)
        return np.where(is_src, 0.0, np.where(linked, cost, np.inf))

    entry = one_way(p.has_link[src, nodes], p.rtt_s[src, nodes], p.bandwidth_bytes_per_s[src, nodes],
                    p.input_bytes_per_token)  # fmt: skip
    exit_ = one_way(p.has_link[nodes, src], p.rtt_s[nodes, src], p.bandwidth_bytes_per_s[nodes, src],
                    p.result_bytes_per_token)  # fmt: skip
    return hop, entry, exit_


class _Columns:
    """A sparse LP under construction: columns with cost and bounds, (row, col, value) entries."""

    def __init__(self) -> None:
        self.cost: list[float] = []
        self.upper: list[float] = []
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.vals: list[np.ndarray] = []

    def add(self, cost, upper, entries: list[tuple[np.ndarray, float | np.ndarray]]) -> np.ndarray:
        """Columns with these costs and upper bounds; ``entries`` are (row per column, value)."""
        cost = np.atleast_1d(np.asarray(cost, dtype=np.float64))
        start = len(self.cost)
        idx = np.arange(start, start + len(cost))
        self.cost.extend(cost.tolist())
        self.upper.extend(np.broadcast_to(np.asarray(upper, dtype=np.float64), cost.shape).tolist())
        for rows, value in entries:
            self.rows.append(np.asarray(rows, dtype=np.int64))
            self.cols.append(idx)
            self.vals.append(np.broadcast_to(np.asarray(value, dtype=np.float64), cost.shape))
        return idx

    def matrix(self, row_ids: np.ndarray, n_rows: int):
        """The rows ``row_ids`` (of the global numbering) as a CSR matrix, in that order."""
        rows, cols, vals = (np.concatenate(a) for a in (self.rows, self.cols, self.vals))
        remap = np.full(n_rows, -1)
        remap[row_ids] = np.arange(len(row_ids))
        keep = remap[rows] >= 0
        shape = (len(row_ids), len(self.cost))
        return coo_matrix((vals[keep], (remap[rows[keep]], cols[keep])), shape=shape).tocsr()


def latency_lp(
    problem: Problem, allowed: np.ndarray, deadline: float, candidates_only: bool = True
) -> LatencyLp | None:
    """Solve the bound's LP; None when it does not apply, fails, or the deadline passes first.

    ``candidates_only``: over the nodes that can hold a unit (a valid and slightly
    tighter bound, and far smaller at 1,000 nodes); else over every node, as
    before 2026-12-03, which gives another node order (see ``_latency_lp``).
    """
    t0 = time.monotonic()
    p = problem
    groups = unit_groups(p, allowed)
    if groups is None:
        return None
    # Only nodes that can hold a unit can host a stage: the LP is over those alone (exact, and at
    # 1,000 nodes of which a few hundred hold a layer, much smaller). Indices below are into them.
    cand = np.flatnonzero(allowed.any(axis=0)) if candidates_only else np.arange(p.num_nodes)
    n_count = len(cand)
    if n_count == 0:
        return None
    nodes = np.arange(n_count)
    allowed = allowed[:, cand]
    fps = p.flops_per_s[cand]
    hop, entry, exit_ = hop_costs(p, cand)
    cap = p.memory_bytes[cand].astype(np.float64)
    # Rows. Equalities: one per group, in[n], out[n], entry total, exit total.
    g_count = len(groups)
    row_in, row_out = g_count + nodes, g_count + n_count + nodes
    row_entry, row_exit = g_count + 2 * n_count, g_count + 2 * n_count + 1
    n_eq = row_exit + 1
    # Inequalities: memory[n], memory-per-stage[n], stage-needs-a-unit[n], then fit[t, n].
    row_mem, row_per_stage, row_unit = n_eq + nodes, n_eq + n_count + nodes, n_eq + 2 * n_count + nodes
    # Then first[n], last[n]: a unit alone in its group at either end of the chain sits on
    # the first (last) stage's node: x[g, n] <= e[n] (q[n]).
    row_first, row_last = n_eq + 3 * n_count + nodes, n_eq + 4 * n_count + nodes
    n_rows = n_eq + 5 * n_count + g_count * n_count
    g_first, g_last = _end_groups(groups, p.num_units)
    lp = _Columns()
    unit_cols = []
    lp.add(
        np.zeros(n_count), np.inf, [(row_in, -1.0), (row_out, -1.0), (row_per_stage, -cap), (row_unit, 1.0)]
    )
    for g, units in enumerate(groups):
        size = float(p.unit_memory_bytes[units[0]])
        # Units that take no memory (an empty embedding) fit any number of times.
        fits = np.floor(cap / size) if size > 0 else np.full(n_count, float(len(units)))
        fits = np.minimum(fits, len(units))
        where = np.flatnonzero(allowed[units[0]] & (fits >= 1))
        cost = p.workload.tokens * float(p.flops_per_token[units[0]]) / fps[where]
        fit_rows = n_eq + 5 * n_count + g * n_count + where
        ends = [(row_first[where], 1.0)] if g == g_first else []
        ends += [(row_last[where], 1.0)] if g == g_last else []
        unit_cols.append((where, lp.add(cost, np.minimum(fits[where], len(units)),
               [(np.full(len(where), g), 1.0), (row_mem[where], size), (row_per_stage[where], size),
                (row_unit[where], -1.0), (fit_rows, 1.0), *ends])))  # fmt: skip
        # fit[t, n]: x[t, n] - fits * z[n] <= 0
        lp.rows.append(fit_rows)
        lp.cols.append(where)
        lp.vals.append(-fits[where])
    src, dst, wildcard = _sparse_arcs(hop)
    arc_cols = lp.add(hop[src, dst], np.inf, [(row_out[src], 1.0), (row_in[dst], 1.0)])
    has_wild = np.isfinite(wildcard)
    lp.add(wildcard[has_wild], np.inf, [(row_in[has_wild], 1.0)])
    lp.add(np.zeros(n_count), np.inf, [(row_out, 1.0)])
    ok_in, ok_out = np.isfinite(entry), np.isfinite(exit_)
    entry_cols = lp.add(entry[ok_in], 1.0, [(row_in[ok_in], 1.0), (np.full(ok_in.sum(), row_entry), 1.0),
                                            (row_first[ok_in], -1.0)])  # fmt: skip
    lp.add(exit_[ok_out], 1.0, [(row_out[ok_out], 1.0), (np.full(ok_out.sum(), row_exit), 1.0),
                                (row_last[ok_out], -1.0)])  # fmt: skip
    b_eq = np.zeros(n_eq)
    b_eq[:g_count] = [len(units) for units in groups]
    b_eq[row_entry] = b_eq[row_exit] = 1.0
    ub_ids = np.arange(n_eq, n_rows)
    b_ub = np.zeros(len(ub_ids))
    b_ub[:n_count] = cap
    left = deadline - time.monotonic()
    if left <= 0:
        return None
    res = linprog(
        lp.cost,
        A_ub=lp.matrix(ub_ids, n_rows),
        b_ub=b_ub,
        A_eq=lp.matrix(np.arange(n_eq), n_rows),
        b_eq=b_eq,
        bounds=np.column_stack([np.zeros(len(lp.upper)), lp.upper]),
        method="highs-ipm",  # interior point, then crossover to a vertex: 25 % faster at 1,000 nodes
        options={"time_limit": left},
    )
    if res.status != 0:
        return None
    x = res.x
    flows = x[arc_cols]
    used = flows > 1e-6
    arcs = [(int(a), int(b), float(f)) for a, b, f in zip(src[used], dst[used], flows[used], strict=True)]
    entry_flow = np.zeros(n_count)
    entry_flow[ok_in] = x[entry_cols]
    placed = np.zeros((g_count, n_count))
    for g, (where, cols) in enumerate(unit_cols):
        placed[g, where] = x[cols]
    bound = float(res.fun) - BOUND_SLACK * abs(float(res.fun))
    return LatencyLp(
        bound, x[:n_count], placed, groups, arcs, entry_flow, hop, entry, exit_, time.monotonic() - t0, cand
    )


def _end_groups(groups: list[np.ndarray], u_count: int) -> tuple[int | None, int | None]:
    """The groups holding only the first unit, only the last unit (None where there is none)."""
    first = next((g for g, units in enumerate(groups) if list(units) == [0]), None)
    last = next((g for g, units in enumerate(groups) if list(units) == [u_count - 1]), None)
    return first, last


def _sparse_arcs(hop: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each node's ``IN_ARCS`` cheapest incoming hops, and the cost of its cheapest one left out."""
    n_count = hop.shape[0]
    k = min(IN_ARCS, n_count)
    cols = np.arange(n_count)
    wildcard = np.full(n_count, np.inf)
    if k < n_count:
        # The k cheapest per column and, at row k, the cheapest one left out (a partial sort).
        part = np.argpartition(hop, k, axis=0)
        wildcard = hop[part[k], cols]
        order = part[:k]
    else:
        order = np.argsort(hop, axis=0)[:k]
    src = order.T.ravel()
    dst = np.repeat(cols, k)
    keep = np.isfinite(hop[src, dst])
    return src[keep], dst[keep], wildcard


def lp_order(lp: LatencyLp, deadline: float = float("inf")) -> list[int]:
    """The nodes the LP uses as one path: its hops matched, cycles patched (Karp), then or-3opt.

    The path runs from a depot (the entry and exit hops are its arcs) through
    every node with stages in the LP and back. The work is on those nodes
    only: index i is ``used[i]``, the depot is the last index. Returns problem node indices.
    """
    used = [int(n) for n in np.flatnonzero(lp.stages > 1e-6)]
    if not used:
        return []
    local = {n: i for i, n in enumerate(used)}
    idx = np.array(used)
    cost = depot_costs(lp.hop[np.ix_(idx, idx)], lp.entry_cost[idx], lp.exit_cost[idx])
    depot = len(used)
    flows = [(f, local[a], local[b]) for a, b, f in lp.arcs if a in local and b in local]
    flows += [(float(lp.entry[n]), depot, local[n]) for n in used]
    first, last = (local.get(n) if n is not None else None for n in _end_nodes(lp))
    if last == first:
        last = None  # one node at both ends (a U shape): the order cannot say so; leave it free
    forced = {depot: first} if first is not None else {}
    if last is not None:
        forced[last] = depot
    succ = _match(list(range(depot + 1)), flows, cost, forced)
    cycle = _patch(succ, cost, depot)
    if first is not None and cycle[1] != first:  # patching moved it: put it back
        cycle.remove(first)
        cycle.insert(1, first)
    if last is not None and cycle[-1] != last:
        cycle.remove(last)
        cycle.append(last)
    cycle = improve_cycle(cycle, cost, int(first is not None), int(last is not None), deadline)
    return [int(lp.nodes[used[i]]) for i in cycle if i != depot]


def _end_nodes(lp: LatencyLp) -> tuple[int | None, int | None]:
    """The nodes the LP puts the first and the last unit on, when each is a group of its own.

    Such a unit (an embedding, a head) fixes which node a path must start
    (end) with; hop costs alone would not keep it there.
    """
    u_last = max(int(g.max()) for g in lp.groups)
    ends = []
    for unit in (0, u_last):
        g = next(k for k, units in enumerate(lp.groups) if unit in units)
        ends.append(int(np.argmax(lp.units[g])) if len(lp.groups[g]) == 1 else None)
    return ends[0], ends[1]


def depot_costs(hop: np.ndarray, entry: np.ndarray, exit_: np.ndarray) -> np.ndarray:
    """(N+1, N+1) hop costs with a depot N whose arcs are the entry and exit hops."""
    n_count = hop.shape[0]
    cost = np.full((n_count + 1, n_count + 1), np.inf)
    cost[:n_count, :n_count] = hop
    cost[n_count, :n_count] = entry
    cost[:n_count, n_count] = exit_
    np.fill_diagonal(cost, np.inf)
    # Finite, so that differences of missing links stay numbers (no path is anywhere near this).
    return np.minimum(cost, NO_LINK_S)


def _match(
    members: list[int], flows: list[tuple[float, int, int]], cost: np.ndarray, forced: dict[int, int]
) -> dict[int, int]:
    """A successor for every member: ``forced`` ones, the LP's largest flows, then the cheapest hops left."""
    inside = set(members)
    succ: dict[int, int] = dict(forced)
    taken: set[int] = set(forced.values())
    for _, a, b in sorted(flows, reverse=True):
        if a in inside and b in inside and a not in succ and b not in taken:
            succ[a] = b
            taken.add(b)
    outs = [a for a in members if a not in succ]
    ins = [b for b in members if b not in taken]
    while outs:
        sub = cost[np.ix_(outs, ins)]
        sub = np.where(np.isfinite(sub), sub, 1e18)
        i, j = np.unravel_index(int(np.argmin(sub)), sub.shape)
        if outs[i] == ins[j] and len(outs) > 1:  # a self-loop only when nothing else is left
            sub[i, j] = np.inf
            i, j = np.unravel_index(int(np.argmin(sub)), sub.shape)
        succ[outs.pop(i)] = ins.pop(j)
    return succ


def _cycles(succ: dict[int, int]) -> list[list[int]]:
    seen: set[int] = set()
    out = []
    for start in succ:
        if start in seen:
            continue
        cyc, n = [], start
        while n not in seen:
            seen.add(n)
            cyc.append(n)
            n = succ[n]
        out.append(cyc)
    return out


def _patch(succ: dict[int, int], cost: np.ndarray, depot: int) -> list[int]:
    """Join the successor function's cycles into the depot's, each time by the cheapest arc exchange."""
    cycles = _cycles(succ)
    main = next(c for c in cycles if depot in c)
    others = [c for c in cycles if depot not in c]
    while others:
        a = np.array(main)
        b_ = np.roll(a, -1)
        best = None
        for k, cyc in enumerate(others):
            c = np.array(cyc)
            d = np.roll(c, -1)
            # Replace a->b and c->d by a->d and c->b: the cycle c is spliced in between a and b.
            delta = cost[a[:, None], d[None, :]] + cost[c[None, :], b_[:, None]] - cost[a, b_][:, None]
            delta = delta - cost[c, d][None, :]
            i, j = np.unravel_index(int(np.argmin(delta)), delta.shape)
            if best is None or delta[i, j] < best[0]:
                best = (delta[i, j], k, i, j)
        _, k, i, j = best
        cyc = others.pop(k)
        spliced = cyc[j + 1 :] + cyc[: j + 1]  # starts at d, ends at c
        main = main[: i + 1] + spliced + main[i + 1 :]
    at = main.index(depot)
    return main[at:] + main[:at]


def improve_cycle(
    order: list[int], cost: np.ndarray, head: int = 0, tail: int = 0, deadline: float = float("inf")
) -> list[int]:
    """Swap two adjacent runs of a cycle (or-3opt, no run reversed) while that shortens it.

    ``order`` starts at the depot; the ``head`` nodes after it and the
    ``tail`` nodes at its end stay in place. Each round tries every (i, j, k):
    c[:i+1] + c[j+1:k+1] + c[i+1:j+1] + c[k+1:], and takes the best move.
    """
    c = np.asarray(order)
    m = len(c)
    top = m - 1 - tail  # the last position a moved run may end at
    while time.monotonic() < deadline:
        nxt = np.roll(c, -1)
        arc = cost[c, nxt]  # arc[p]: from position p to p + 1
        best = (0.0, None)
        for i in range(head, top - 1):
            j = np.arange(i + 1, top)[:, None]
            k = np.arange(i + 2, top + 1)[None, :]
            ok = k > j
            jj, kk = np.broadcast_to(j, ok.shape), np.broadcast_to(k, ok.shape)
            new = cost[c[i], nxt[jj]] + cost[c[kk], nxt[i]] + cost[c[jj], nxt[kk]]
            delta = np.where(ok, new - arc[i] - arc[jj] - arc[kk], np.inf)
            at = np.unravel_index(int(np.argmin(delta)), delta.shape)
            if delta[at] < best[0] - 1e-12:
                best = (float(delta[at]), (i, int(jj[at]), int(kk[at])))
        if best[1] is None:
            break
        i, j, k = best[1]
        c = np.concatenate([c[: i + 1], c[j + 1 : k + 1], c[i + 1 : j + 1], c[k + 1 :]])
    return [int(n) for n in c]
