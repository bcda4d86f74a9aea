"""Plans that attain a packing bound: the packing's nodes in a chain order the links allow.

A packing (a count vector per node, :mod:`edgeorch.planning.packing`) forgets
the chain order and the links. When the layers are interchangeable, any order
of its nodes whose consecutive pairs are linked runs the same units at the
same cost, so the ordered programme
(:func:`~edgeorch.planning.heuristics.ordered_plan`) over such an order finds
a plan at least as good as the packing: one that attains the lower bound, and
so is proven optimal. Finding the order is a Hamiltonian path over the few
nodes the packing uses, which a depth-first search with Warnsdorff's rule
(fewest onward links first) settles at once on meshes with a few links
missing. When units are not interchangeable the plan is only a candidate;
the caller checks every plan in full either way.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from edgeorch.planning.heuristics import ordered_plan
from edgeorch.planning.problem import Stage
from edgeorch.planning.relax import Relaxer

# Node expansions the order search may spend per (first, last) pair.
ORDER_SEARCH_STEPS = 4000
# (first node, last node) pairs tried per packing.
MAX_END_PAIRS = 6


def usable_links(r: Relaxer, limit: float | None) -> np.ndarray:
    """(N, N) links a hop between stages may take; under ``limit`` (s/token) with any boundary's bytes."""
    if limit is None:
        return r.trans_ok
    u_count = r.problem.num_units
    widest = float(r.bytes_at[1:u_count].max()) if u_count > 1 else 0.0
    return r.trans_ok & (r.hop_load * widest <= limit)


def hamiltonian_path(
    adj: np.ndarray,
    nodes: list[int],
    first: int,
    last: int,
    steps: int,
    deadline: float = float("inf"),
    rank: np.ndarray | None = None,
) -> list[int] | None:
    """A path from ``first`` to ``last`` through every node of ``nodes`` once, or None.

    ``first == last`` asks for a cycle: the path leaves it and comes back.
    Gives up after ``steps`` expansions or at ``deadline`` (the search is
    exponential at worst). ``rank`` (per node, lower first) orders the next
    hops before Warnsdorff's rule does.
    """
    if nodes == [first] and first == last:
        return [first]
    left = np.zeros(adj.shape[0], dtype=bool)
    left[nodes] = True
    left[[first, last]] = False
    if not _degrees_allow(adj, left, first, last):
        return None
    path = [first]
    budget = [steps]

    def extend(at: int, remaining: int) -> bool:
        if remaining == 0:
            return bool(adj[at, last])
        budget[0] -= 1
        if budget[0] < 0 or time.monotonic() > deadline:
            return False
        options = np.flatnonzero(adj[at] & left)
        onward = (adj[options] & left).sum(axis=1)
        keys = (onward,) if rank is None else (onward, rank[options])
        for n in options[np.lexsort(keys)].tolist():
            path.append(n)
            left[n] = False
            if extend(n, remaining - 1):
                return True
            left[n] = True
            path.pop()
        return False

    if not extend(first, int(left.sum())):
        return None
    return [*path, last]


def _degrees_allow(adj: np.ndarray, inner: np.ndarray, first: int, last: int) -> bool:
    """Every inner node needs a link in from the path's other nodes and one out to them: else no path."""
    sources, sinks = inner.copy(), inner.copy()
    sources[first] = sinks[last] = True
    has_in = adj[np.ix_(sources, inner)].any(axis=0)
    has_out = adj[np.ix_(inner, sinks)].any(axis=1)
    return bool(has_in.all() and has_out.all())


def _ends(r: Relaxer, take: np.ndarray, unit_class: np.ndarray, limit: float | None) -> list[tuple[int, int]]:
    """(node with the first unit, node with the last unit) pairs the packing allows, reachable from the source."""
    p = r.problem
    entry = r.entry_linked if limit is None else r.entry_linked & (r.entry_load <= limit)
    exit_ = r.exit_linked if limit is None else r.exit_linked & (r.exit_load <= limit)
    firsts = [int(n) for n in np.flatnonzero(take[:, unit_class[0]] > 0) if entry[n]]
    lasts = [int(n) for n in np.flatnonzero(take[:, unit_class[-1]] > 0) if exit_[n]]
    same_class = unit_class[0] == unit_class[-1]
    pairs = []
    for a in firsts:
        for b in lasts:
            if a != b or not same_class or take[a, unit_class[0]] >= 2 or p.num_units == 1:
                pairs.append((a, b))
    return pairs[:MAX_END_PAIRS]


def realised_plans(
    r: Relaxer,
    take: np.ndarray,
    unit_class: np.ndarray,
    limit: float | None = None,
    deadline: float = float("inf"),
) -> Iterator[list[Stage]]:
    """Ordered plans over the nodes of a packing, in orders the links allow (throughput: under ``limit``).

    A node holding both the first and the last unit (a U-shape) appears as
    the first and the last slot, its memory (and load under ``limit``) split
    between them at each cut its packed units allow, the smallest first slot
    first. Stops at ``deadline`` (``time.monotonic()``).
    """
    used = [int(n) for n in np.flatnonzero(take.sum(axis=1) > 0)]
    adj = usable_links(r, limit)
    rank = _current_rank(r)
    for first, last in _ends(r, take, unit_class, limit):
        if time.monotonic() > deadline:
            return
        order = hamiltonian_path(adj, used, first, last, ORDER_SEARCH_STEPS, deadline, rank)
        if order is None:
            continue
        if first != last or len(order) == 1:
            stages = ordered_plan(r, order)
            if stages is not None:
                yield stages
            continue
        yield from _u_shaped_splits(r, order, int(take[first].sum()), limit, deadline)


def _current_rank(r: Relaxer) -> np.ndarray | None:
    """Where each node first appears in the current plan (absent: last), so orders follow it.

    A plan in the current order can keep units where they are; in another it
    may have to move them.
    """
    owner = r.problem.current_owner
    if owner is None:
        return None
    rank = np.full(r.problem.num_nodes, len(owner), dtype=np.int64)
    for u in range(len(owner) - 1, -1, -1):
        if owner[u] >= 0:
            rank[owner[u]] = u
    return rank


def _u_shaped_splits(
    r: Relaxer, order: list[int], units: int, limit: float | None, deadline: float
) -> Iterator[list[Stage]]:
    """``order`` with its first node also last: its ``units`` split as a prefix of k and the rest."""
    p = r.problem
    x = order[0]
    memory = int(p.memory_bytes[x])
    for k in range(1, max(units, 2)):
        if time.monotonic() > deadline:
            return
        head_mem = int(r.mem_prefix[k])
        if head_mem > memory:
            return
        caps = p.memory_bytes[np.array(order)].copy()
        caps[0], caps[-1] = head_mem, memory - head_mem
        load_caps = None
        if limit is not None:
            load_caps = np.full(len(order), limit)
            head_load = float(r.load_prefix[k, x])
            load_caps[0], load_caps[-1] = head_load * (1 + 1e-12), max(limit - head_load, 0.0)
        stages = ordered_plan(r, order, caps, load_caps)
        if stages is not None:
            yield stages
