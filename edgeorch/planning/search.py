"""Branch and bound over the per-stage relaxation: exactness when nodes host several stages.

The relaxation (:class:`~edgeorch.planning.relax.Relaxer`) checks each stage on
its own. A node hosting several stages may then exceed its memory in total
(or, for throughput, its load; a link carrying several hops its bandwidth), and
a migration cap is a limit on the whole plan. When the relaxed optimum breaks
such a coupled limit, some set D of its choices cannot all hold in any
acceptable plan ("not all of these units on node n"). Branching on the first
choice of D that does not hold splits the acceptable plans into disjoint
children, each one constraint tighter, so the search is finite and, when it
runs to the end, exact. Children are explored best bound first; a time limit
stops it with the best plan found and the smallest open bound.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from edgeorch.planning.cost import evaluate, score
from edgeorch.planning.problem import Stage
from edgeorch.planning.relax import Constraints, Relaxed, Relaxer

log = logging.getLogger(__name__)

# Plans are compared with this relative tolerance: the relaxation and the cost
# model sum the same floats in different orders.
RTOL = 1e-9

Literal = tuple  # ("on", unit, node) | ("hop", boundary, src, dst) | ("move", unit, owner)


@dataclass(frozen=True)
class SearchOutcome:
    """What the search found: the best plan (or None), its score, and how sure it is."""

    stages: tuple[Stage, ...] | None
    value: float
    bound: float
    optimal: bool
    nodes: int
    timed_out: bool


class Search:
    """One best-first branch and bound run over a problem's relaxation."""

    def __init__(self, relaxer: Relaxer, deadline: float, extra_bound: float = 0.0):
        self.r = relaxer
        self.p = relaxer.problem
        self.deadline = deadline
        self.extra_bound = extra_bound
        self.best_value = float("inf")
        self.best_stages: tuple[Stage, ...] | None = None
        self.nodes = 0
        self._counter = itertools.count()

    # -- incumbent -------------------------------------------------------
    def offer(self, stages: Sequence[Stage]) -> None:
        """Keep ``stages`` if it is feasible in full (coupled limits included) and better."""
        ev = evaluate(self.p, stages)
        if np.any(ev.node_memory_bytes > self.p.memory_bytes):
            return
        cap = self.p.max_migration_bytes
        if cap is not None and ev.migration_bytes > cap:
            return
        value = score(self.p, ev)
        if value < self.best_value - RTOL * abs(value):
            self.best_value = value
            self.best_stages = tuple(stages)

    def threshold(self) -> float | None:
        """For throughput: only plans strictly better than the incumbent are of interest."""
        if self.p.objective != "throughput" or not np.isfinite(self.best_value):
            return None
        return self.best_value * (1 - RTOL)

    def pruned(self, bound: float) -> bool:
        """True when nothing under this bound can beat the incumbent."""
        return bound >= self.best_value - RTOL * abs(self.best_value)

    # -- branching -------------------------------------------------------
    def disjunction(self, node: Relaxed, cons: Constraints) -> list[Literal] | None:
        """Choices of ``node`` that cannot all hold in an acceptable plan; None if it is acceptable."""
        p, assign = self.p, node.assign
        used = np.zeros(p.num_nodes, dtype=np.int64)
        np.add.at(used, assign, self.r.mem)
        over = used - p.memory_bytes
        worst = int(np.argmax(over))
        if over[worst] > 0:
            return self._unit_literals(worst, assign, cons, self.r.mem, int(p.memory_bytes[worst]))
        lits = self._migration_literals(assign, cons)
        if lits is not None:
            return lits
        limit = self.threshold()
        if limit is None:
            return None
        return self._load_literals(node, cons, limit)

    def _unit_literals(self, n: int, assign, cons: Constraints, weight, budget) -> list[Literal] | None:
        pinned = [u for u, m in cons.forced if m == n]
        total = sum(weight[u] for u in pinned)
        free = [int(u) for u in np.flatnonzero(assign == n) if (int(u), n) not in cons.forced and weight[u] > 0]
        # Largest first: the fewest literals reach the budget, so the fewest children.
        free.sort(key=lambda u: -weight[u])
        lits: list[Literal] = []
        for u in free:
            lits.append(("on", u, n))
            total += weight[u]
            if total > budget:
                return lits
        return None

    def _migration_literals(self, assign, cons: Constraints) -> list[Literal] | None:
        cap, owner = self.p.max_migration_bytes, self.p.current_owner
        if cap is None or owner is None:
            return None
        params = self.p.param_bytes
        moved = np.flatnonzero(assign != owner)
        if int(params[moved].sum()) <= cap:
            return None
        # Units whose node is gone move in every plan: they are not choices.
        fixed = {int(u) for u in moved if owner[u] < 0 or u in cons.must_move}
        total = sum(int(params[u]) for u in fixed)
        free = sorted((int(u) for u in moved if int(u) not in fixed and params[u] > 0), key=lambda u: -params[u])
        lits: list[Literal] = []
        for u in free:
            lits.append(("move", u, int(owner[u])))
            total += int(params[u])
            if total > cap:
                return lits
        return None

    def _load_literals(self, node: Relaxed, cons: Constraints, limit: float) -> list[Literal] | None:
        p, assign = self.p, node.assign
        unit_load = p.flops_per_token / p.flops_per_s[assign]
        loads = np.zeros(p.num_nodes)
        np.add.at(loads, assign, unit_load)
        links = self._hops(node.stages)
        link_loads = {k: sum(h[1] for h in v) for k, v in links.items()}
        worst_node = int(np.argmax(loads))
        worst_link = max(link_loads, key=link_loads.get, default=None)
        if worst_link is not None and link_loads[worst_link] > loads[worst_node]:
            if link_loads[worst_link] <= limit:
                return None
            return self._hop_literals(worst_link, links[worst_link], cons, limit)
        if loads[worst_node] <= limit:
            return None
        return self._unit_literals(worst_node, assign, cons, unit_load, limit)

    def _hops(self, stages: Sequence[Stage]) -> dict[tuple[int, int], list[tuple[int, float]]]:
        """Hops of a plan per directed link, as (boundary, per-token load)."""
        src, u_count = self.p.source, self.p.num_units
        path = [(src, 0), *[(s.node, s.start) for s in stages], (src, u_count)]
        links: dict[tuple[int, int], list[tuple[int, float]]] = {}
        for (m, _), (n, k) in itertools.pairwise(path):
            if m != n:
                links.setdefault((m, n), []).append((k, self.r.bytes_at[k] * self.r.hop_load[m, n]))
        return links

    def _hop_literals(self, link, hops, cons: Constraints, limit: float) -> list[Literal] | None:
        m, n = link
        u_count, src = self.p.num_units, self.p.source

        def forced(k: int) -> bool:
            before = (k == 0 and m == src) or (k - 1, m) in cons.forced
            after = (k == u_count and n == src) or (k, n) in cons.forced
            return before and after

        total = sum(load for k, load in hops if forced(k))
        lits: list[Literal] = []
        for k, load in sorted((h for h in hops if not forced(h[0])), key=lambda h: -h[1]):
            lits.append(("hop", k, m, n))
            total += load
            if total > limit:
                return lits
        return None

    def apply(self, cons: Constraints, lit: Literal, holds: bool) -> Constraints | None:
        """``cons`` plus the literal (or its negation); None if that contradicts ``cons``."""
        forced, forbidden = set(cons.forced), set(cons.forbidden)
        hops, must = set(cons.forbidden_hops), set(cons.must_move)
        places: list[tuple[int, int]] = []
        bans: list[tuple[int, int]] = []
        if lit[0] == "on":
            (places if holds else bans).append((lit[1], lit[2]))
        elif lit[0] == "move":
            if holds:
                bans.append((lit[1], lit[2]))
                must.add(lit[1])
            else:
                places.append((lit[1], lit[2]))
        else:
            _, k, m, n = lit
            u_count = self.p.num_units
            if holds:
                places += [(k - 1, m)] if k > 0 else []
                places += [(k, n)] if k < u_count else []
            elif k == 0:
                bans.append((0, n))
            elif k == u_count:
                bans.append((u_count - 1, m))
            else:
                hops.add((k, m, n))
        for u, node in places:
            if (u, node) in forbidden or any(f[0] == u and f[1] != node for f in forced):
                return None
            forced.add((u, node))
        for u, node in bans:
            if (u, node) in forced:
                return None
            forbidden.add((u, node))
        return Constraints(frozenset(forced), frozenset(forbidden), frozenset(hops), frozenset(must))

    def children(self, cons: Constraints, lits: list[Literal]) -> Iterable[Constraints]:
        """Child i: literals before i hold, literal i does not (a partition of ``cons``)."""
        prefix: Constraints | None = cons
        for lit in lits:
            if prefix is None:
                return
            child = self.apply(prefix, lit, holds=False)
            if child is not None:
                yield child
            prefix = self.apply(prefix, lit, holds=True)

    # -- main loop -------------------------------------------------------
    def run(self, root_cons: Constraints, root: Relaxed, starts: Iterable[Sequence[Stage]]) -> SearchOutcome:
        """Search from the relaxed root; ``starts`` are heuristic plans tried first."""
        self.offer(root.stages)
        heap: list = []
        root_bound = max(root.value, self.extra_bound)
        if not self.pruned(root_bound) and self.disjunction(root, root_cons) is not None:
            for stages in starts:
                self.offer(stages)
                if time.monotonic() > self.deadline:
                    break
            if not self.pruned(root_bound):
                heap.append((root_bound, 0, next(self._counter), root, root_cons))
        abandoned = float("inf")
        timed_out = False
        while heap:
            if time.monotonic() > self.deadline:
                timed_out = True
                break
            bound, depth, _, node, cons = heapq.heappop(heap)
            if self.pruned(bound):
                continue
            lits = self.disjunction(node, cons)
            if lits is None:
                continue
            for child in self.children(cons, lits):
                if time.monotonic() > self.deadline:
                    abandoned = min(abandoned, bound)
                    timed_out = True
                    break
                self._expand(child, bound, depth, heap)
        open_bounds = [b for b, *_ in heap if not self.pruned(b)]
        lowest = min([self.best_value, abandoned, *open_bounds])
        bound = max(lowest, self.extra_bound) if np.isfinite(lowest) else lowest
        optimal = not timed_out or self.pruned(bound)
        log.debug("search: %d nodes, best %.6g, bound %.6g, timed out %s", self.nodes, self.best_value, bound, timed_out)
        return SearchOutcome(self.best_stages, self.best_value, bound, optimal, self.nodes, timed_out)

    def _expand(self, cons: Constraints, parent_bound: float, depth: int, heap: list) -> None:
        sol = self.r.solve(cons, self.threshold())
        self.nodes += 1
        if sol is None:
            return
        self.offer(sol.stages)
        bound = max(sol.value, parent_bound)
        if not self.pruned(bound):
            heapq.heappush(heap, (bound, depth - 1, next(self._counter), sol, cons))
