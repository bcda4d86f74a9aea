"""Whole-unit packings of the units onto nodes, chain order and links forgotten.

Units fall into few classes (embedding, identical layers, head), so what a
node takes can be written as a count vector per class. A dynamic programme
over the nodes, whose state is the count vector still to place, then finds
the cheapest packing (energy) or whether one exists with every node's load
within T (throughput). Both are lower bounds on the real problem, which adds
chain order and links; and the packing that attains the bound is the best
hint there is for a plan that attains it too (:mod:`edgeorch.planning.realise`).

States are count vectors in C order, so that the flat index of ``s - v`` is
``index(s) - index(v)``: one node's step is a gather over every (state,
vector) pair and a ``minimum.reduceat`` per destination state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeorch.planning.problem import Problem

# (state, vector) pairs times nodes beyond which a packing programme costs more than it saves.
MAX_PACKING_WORK = 12_000_000
# Count vectors (states) beyond which the classes are too varied to enumerate.
MAX_STATES = 20_000


@dataclass(frozen=True)
class Packer:
    """The count-vector programme of one problem: classes, states, and which node may take what.

    ``unit_class[u]`` is unit u's class; ``vectors[i]`` the count vector of
    state i; ``fits[n, i]`` whether node n may hold vector i (memory and
    privacy). Pairs (``pair_state``, ``pair_vector``) are sorted by their
    destination ``state - vector`` (the zero vector first within each), and
    ``starts`` are the offsets of each destination's run.
    """

    unit_class: np.ndarray
    counts: np.ndarray
    vectors: np.ndarray
    flops: np.ndarray
    memory: np.ndarray
    fits: np.ndarray
    pair_state: np.ndarray
    pair_vector: np.ndarray
    starts: np.ndarray

    @property
    def num_states(self) -> int:
        """Count vectors from nothing to everything."""
        return self.vectors.shape[0]

    def run(self, weight: np.ndarray) -> list[np.ndarray]:
        """Least cost to have each state left after nodes 0..n-1, for n = 0..N (N+1 tables).

        ``weight[n, i]`` is what node n pays to take vector i (inf: it may
        not). The first table has only the full state at 0.
        """
        state, vector, starts = self._pairs(np.isfinite(weight).any(axis=0))
        cost = np.full(self.num_states, np.inf)
        cost[-1] = 0.0
        tables = [cost]
        for w in weight:
            if not np.isfinite(w[1:]).any():
                tables.append(cost)  # this node takes nothing: the table stays
                continue
            cost = np.minimum.reduceat(cost[state] + w[vector], starts)
            tables.append(cost)
        return tables

    def _pairs(self, active: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The pairs whose vector some node may take (fewer when loads are tight), with their runs."""
        if active.all():
            return self.pair_state, self.pair_vector, self.starts
        keep = active[self.pair_vector]
        state, vector = self.pair_state[keep], self.pair_vector[keep]
        dest = state - vector
        return state, vector, np.flatnonzero(np.r_[True, dest[1:] != dest[:-1]])

    def argmin(self, tables: list[np.ndarray], weight: np.ndarray) -> np.ndarray:
        """(N, classes) the count vector per node of a packing that attains ``tables[-1][0]``.

        Walks back from "nothing left"; a node takes nothing whenever that
        ties, so the packing uses as few nodes as the optimum allows.
        """
        take = np.zeros((weight.shape[0], self.counts.size), dtype=np.int64)
        state = 0
        for n in range(weight.shape[0] - 1, -1, -1):
            before, after = tables[n], tables[n + 1]
            if before[state] <= after[state]:
                continue
            group = slice(self.starts[state], self.starts[state + 1] if state + 1 < self.num_states else None)
            values = before[self.pair_state[group]] + weight[n, self.pair_vector[group]]
            k = int(np.argmin(values))
            vector = int(self.pair_vector[group][k])
            take[n] = self.vectors[vector]
            state = int(self.pair_state[group][k])
        return take


def unit_classes(problem: Problem, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class per unit by identical (flops, memory, allowed nodes), and per class a representative and count."""
    keys: dict[tuple, int] = {}
    unit_class = np.empty(problem.num_units, dtype=np.int64)
    for u in range(problem.num_units):
        key = (float(problem.flops_per_token[u]), int(problem.unit_memory_bytes[u]), allowed[u].tobytes())
        unit_class[u] = keys.setdefault(key, len(keys))
    reps = np.array([int(np.flatnonzero(unit_class == c)[0]) for c in range(len(keys))], dtype=np.int64)
    return unit_class, reps, np.bincount(unit_class, minlength=len(keys))


def build_packer(problem: Problem, allowed: np.ndarray, max_work: int = MAX_PACKING_WORK) -> Packer | None:
    """The programme for ``problem``, or None when its classes are too many to enumerate.

    Sizes are checked before anything is built: the pairs number
    ``Π (c+1)(c+2)/2`` over the classes' counts c.
    """
    unit_class, reps, counts = unit_classes(problem, allowed)
    per_class = [(c + 1) * (c + 2) // 2 for c in counts.tolist()]
    if np.prod(counts + 1.0) > MAX_STATES or np.prod(per_class, dtype=float) * problem.num_nodes > max_work:
        return None
    grids = np.meshgrid(*[np.arange(c + 1) for c in counts], indexing="ij")
    vectors = np.stack([g.ravel() for g in grids], axis=1)
    pair_state, pair_vector = _pairs_below(counts)
    dest = pair_state - pair_vector
    order = np.lexsort((pair_vector, dest))
    pair_state, pair_vector, dest = pair_state[order], pair_vector[order], dest[order]
    starts = np.flatnonzero(np.r_[True, dest[1:] != dest[:-1]])
    flops = vectors @ problem.flops_per_token[reps]
    memory = vectors @ problem.unit_memory_bytes[reps].astype(np.float64)
    fits = memory[None, :] <= problem.memory_bytes[:, None]
    # A vector may go to a node when none of its classes is barred there.
    barred = (~allowed[reps]).astype(np.int64)
    fits &= ((vectors > 0).astype(np.int64) @ barred).T == 0
    return Packer(unit_class, counts, vectors, flops, memory, fits, pair_state, pair_vector, starts)


def _pairs_below(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of every (state s, vector v) with v <= s componentwise, class by class."""
    dims = tuple(int(c) + 1 for c in counts)
    per_class = [np.array([(s, v) for s in range(d) for v in range(s + 1)]) for d in dims]
    grids = np.meshgrid(*[np.arange(len(pc)) for pc in per_class], indexing="ij")
    picks = [pc[g.ravel()] for pc, g in zip(per_class, grids, strict=True)]
    state = np.ravel_multi_index(tuple(p[:, 0] for p in picks), dims)
    vector = np.ravel_multi_index(tuple(p[:, 1] for p in picks), dims)
    return state, vector


@dataclass(frozen=True)
class PackedBound:
    """A lower bound from packing and a packing that attains it (count vector per node)."""

    value: float
    take: np.ndarray | None


def packed_energy(problem: Problem, packer: Packer) -> PackedBound:
    """Least compute energy over whole-unit packings (exact for the energy problem without links).

    With a current plan, each node also pays the migration weight for the
    bytes it must take in (:func:`least_moved_bytes`), and a cap on them is
    priced in (:func:`_capped`).
    """
    per_flop = problem.workload.tokens * problem.watts / problem.flops_per_s
    energy = np.where(packer.fits, packer.flops[None, :] * per_flop[:, None], np.inf)
    moved = least_moved_bytes(problem, packer) if problem.current_owner is not None else None
    if moved is None:
        return _solve(packer, energy)
    priced = energy + problem.migration_weight * moved
    if problem.max_migration_bytes is None:
        return _solve(packer, priced)
    return _capped(packer, priced, moved, float(problem.max_migration_bytes))


def _solve(packer: Packer, weight: np.ndarray) -> PackedBound:
    tables = packer.run(weight)
    value = float(tables[-1][0])
    return PackedBound(value, packer.argmin(tables, weight) if np.isfinite(value) else None)


def _moved_by(take: np.ndarray, packer: Packer, moved: np.ndarray) -> float:
    """The least moved bytes of a packing (what :func:`least_moved_bytes` charges its nodes)."""
    index = np.ravel_multi_index(tuple(take.T), tuple(int(c) + 1 for c in packer.counts))
    return float(moved[np.arange(take.shape[0]), index].sum())


def _capped(
    packer: Packer, weight: np.ndarray, moved: np.ndarray, cap: float, steps: int = 16
) -> PackedBound:
    """The packing bound under a cap on moved bytes, by a Lagrangian price on them.

    For any price λ >= 0, min(weight + λ·moved) - λ·cap is a lower bound on
    the capped problem; the best λ is where the priced packing's moved bytes
    cross the cap, found by doubling then bisection on a log scale. A
    packing within the cap at λ = 0 is exact.
    """
    best = _solve(packer, weight)
    if best.take is None or _moved_by(best.take, packer, moved) <= cap:
        return best
    lo, hi = 0.0, max(abs(best.value), 1.0) / max(cap, float(moved.max()), 1.0)
    for _ in range(steps):
        priced = _solve(packer, weight + hi * moved)
        if priced.take is None:
            return best
        bound = PackedBound(priced.value - hi * cap, priced.take)
        best = bound if bound.value > best.value else best
        if _moved_by(priced.take, packer, moved) <= cap:
            break
        lo, hi = hi, hi * 4
    else:
        return best
    for _ in range(steps):
        mid = (lo * hi) ** 0.5 if lo > 0 else hi / 4
        priced = _solve(packer, weight + mid * moved)
        if priced.take is None:
            break
        bound = PackedBound(priced.value - mid * cap, priced.take)
        best = bound if bound.value > best.value else best
        if _moved_by(priced.take, packer, moved) <= cap:
            hi = mid
        else:
            lo = mid
        if lo > 0 and hi <= lo * 1.01:
            break
    return best


@dataclass(frozen=True)
class HopLoads:
    """Per-token loads of the hops a plan may take (inf: no link), for the throughput packing.

    ``inner[m, n]`` is the least load of a hop m→n at any inner boundary;
    ``entry[n]``/``exit[n]`` those of the source→n and n→source hops (0 for
    the source itself).
    """

    inner: np.ndarray
    entry: np.ndarray
    exit: np.ndarray

    def values(self) -> np.ndarray:
        """Every finite load: where the set of hops within T changes."""
        every = np.concatenate([self.inner.ravel(), self.entry, self.exit])
        return every[np.isfinite(every)]


def _closure(adj: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Nodes reachable from any of ``start`` along ``adj``."""
    seen = start.copy()
    while True:
        grown = seen | adj[seen].any(axis=0)
        if (grown == seen).all():
            return seen
        seen = grown


def least_moved_bytes(problem: Problem, packer: Packer) -> np.ndarray:
    """(N, S) parameter bytes that must move if node n takes count vector i, whatever the chain.

    Of the k units of a class that n takes, at most as many as n holds now
    can stay; the others arrive, each with at least the class's smallest
    parameter bytes. Units of a node that is gone are held by nobody.
    """
    owner = problem.current_owner
    moved = np.zeros((problem.num_nodes, packer.num_states))
    for c in range(packer.counts.size):
        members = packer.unit_class == c
        held = np.bincount(owner[members & (owner >= 0)], minlength=problem.num_nodes)
        least = float(problem.param_bytes[members].min())
        moved += least * np.maximum(0, packer.vectors[None, :, c] - held[:, None])
    return moved


def hop_roles(packer: Packer, ok: np.ndarray, hops: HopLoads, t: float) -> np.ndarray:
    """``ok`` (N, S) less what no plan within T can use, given that its hops must stay within T too.

    Repeated until nothing changes: a node that can take no unit is not on
    the chain; a node on it must lie on a walk source→...→source of such
    nodes over hops within T; and a node holding some units but not all has
    a hop out after each of its stages except one that ends the chain, and a
    hop in before each except one that starts it. So it needs a hop out
    unless it may hold the last unit and not the first, and a hop in unless
    the reverse. Where the first or last unit's class has other members,
    holding the class does not prove holding the unit, and the rule stays on
    the safe side (it may only allow too much).
    """
    vec = packer.vectors
    first, last = packer.unit_class[0], packer.unit_class[-1]
    has_first, has_last = vec[:, first] > 0, vec[:, last] > 0
    distinct = bool(first != last)
    sure_first = has_first & (distinct and packer.counts[first] == 1)
    sure_last = has_last & (distinct and packer.counts[last] == 1)
    free_out = has_last & ~sure_first
    free_in = has_first & ~sure_last
    some = vec.any(axis=1)
    exempt = (vec == packer.counts[None, :]).all(axis=1) | ~some
    inner = hops.inner <= t
    starts, ends = hops.entry <= t, hops.exit <= t
    while True:
        alive = ok[:, some].any(axis=1)
        links = inner & alive[:, None] & alive[None, :]
        on_chain = _closure(links, alive & starts) & _closure(links.T, alive & ends)
        ok_out = links.any(axis=1)[:, None] | free_out[None, :]
        ok_in = links.any(axis=0)[:, None] | free_in[None, :]
        keep = ((ok_out & ok_in) | exempt[None, :]) & (on_chain[:, None] | ~some[None, :])
        tighter = ok & keep
        if (tighter == ok).all():
            return ok
        ok = tighter


def packed_throughput(
    problem: Problem, packer: Packer, lower: float, upper: float = np.inf, hops: HopLoads | None = None
) -> PackedBound:
    """Least bottleneck T at which whole units pack with every node's load within T, by bisection.

    Feasibility only changes where T passes the load of some node's count
    vector or (with ``hops``, see :func:`hop_roles`) of some hop, so only
    those values are tried, from ``lower`` (a bound already known) up to
    ``upper`` (an incumbent: above it nothing is worth knowing). Returns
    ``lower`` without a packing when none exists in that range. With a cap
    on migration, a packing must also keep its least moved bytes within it;
    the programme then finds the packing that moves least.
    """
    load = packer.flops[None, :] / problem.flops_per_s[:, None]
    tol = 1 + 1e-12
    values = [load[packer.fits].ravel()]
    if hops is not None:
        values.append(hops.values())
    every = np.concatenate(values)
    candidates = np.unique(every[(every >= lower / tol) & (every <= upper * tol)])

    cap = problem.max_migration_bytes
    moved = 0.0
    if cap is not None and problem.current_owner is not None:
        moved = least_moved_bytes(problem, packer)
    limit = np.inf if cap is None else float(cap)

    def attempt(t: float) -> tuple[list[np.ndarray], np.ndarray]:
        ok = packer.fits & (load <= t)
        if hops is not None:
            ok = hop_roles(packer, ok, hops, t)
        weight = np.where(ok, moved, np.inf)
        return packer.run(weight), weight

    def packs(tables: list[np.ndarray]) -> bool:
        least = float(tables[-1][0])
        return np.isfinite(least) and least <= limit

    lo, hi = 0, len(candidates) - 1
    if hi < 0:
        return PackedBound(lower, None)
    tables, weight = attempt(float(candidates[hi]))
    if not packs(tables):
        return PackedBound(max(lower, float(candidates[hi])), None)
    best = (tables, weight)
    while lo < hi:
        mid = (lo + hi) // 2
        tables, weight = attempt(float(candidates[mid]))
        if packs(tables):
            hi, best = mid, (tables, weight)
        else:
            lo = mid + 1
    return PackedBound(max(lower, float(candidates[lo])), packer.argmin(*best))
