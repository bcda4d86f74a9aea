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
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgeorch.planning.branching import Literal, children
from edgeorch.planning.cost import evaluate, score
from edgeorch.planning.problem import Stage
from edgeorch.planning.relax import LOAD, MEMORY, Constraints, Relaxed, Relaxer

log = logging.getLogger(__name__)

# Plans are compared with this relative tolerance: the relaxation and the cost
# model sum the same floats in different orders.
RTOL = 1e-9


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
        self.prices: np.ndarray | None = None
        self.price_bound = -float("inf")
        self._counter = itertools.count()

    # -- incumbent -------------------------------------------------------
    def offer(self, stages: Sequence[Stage]) -> None:
        """Keep ``stages`` if it is feasible in full (coupled limits included) and better."""
        ev = evaluate(self.p, stages)
        if np.any(ev.node_memory_bytes > self.p.memory_bytes) or not all(h.linked for h in ev.hops):
            return
        # Plans from outside the relaxation (the current plan) may break privacy.
        if any(self.p.trusted_mask[s.start : s.end].any() and not self.p.trusted[s.node] for s in stages):
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
    def branch(self, node: Relaxed, cons: Constraints) -> list[Constraints] | None:
        """Children that split the acceptable plans under ``cons`` and all exclude ``node``.

        None when ``node`` itself is acceptable (then it was offered already
        and nothing below it can do better).
        """
        p, assign = self.p, node.assign
        u_count = p.num_units
        limits = [(MEMORY, n, 0, u_count, int(p.memory_bytes[n])) for n in range(p.num_nodes)]
        kids = self._resource_branch(node, cons, MEMORY, self.r.mem, limits)
        if kids is not None:
            return kids
        lits = self._migration_literals(assign, cons)
        if lits is not None:
            return list(children(cons, self.p.num_units, lits))
        limit = self.threshold()
        if limit is None:
            return None
        unit_load = p.flops_per_token / p.flops_per_s[assign]
        limits = [(LOAD, n, 0, u_count, limit) for n in range(p.num_nodes)]
        kids = self._resource_branch(node, cons, LOAD, unit_load, limits)
        if kids is not None:
            return kids
        return self._link_branch(node, cons, limit)

    def _resource_branch(self, node: Relaxed, cons: Constraints, kind: int, weight, whole) -> list | None:
        """Branch on an overrun limit of this resource (a node's total or a region budget).

        The overrun limit with the narrowest region goes first: then no limit
        on a narrower region is overrun, so both children's budgets are
        strictly tighter than any the branch already has for their regions.
        """
        assign = node.assign
        worst, worst_key = None, None
        for limit in [*whole, *(b for b in cons.budgets if b[0] == kind)]:
            _, n, first, end, budget = limit
            used = weight[first:end][assign[first:end] == n].sum()
            key = (end - first, -(used - budget) / max(abs(budget), 1e-300))
            if used > budget and (worst_key is None or key < worst_key):
                worst, worst_key = limit, key
        if worst is None:
            return None
        return self._split(node, cons, worst, weight)

    def _split(self, node: Relaxed, cons: Constraints, limit: tuple, weight) -> list[Constraints]:
        """Split an overrun limit of node n in region [first, end) at a cut between its stages.

        Whatever the plan, either n uses at most x of the region before the
        cut, or more and then at most ``budget - x`` after it. With x just
        below what the relaxed plan uses before the cut, both children
        exclude that plan, and each is a strictly tighter region budget.
        """
        kind, n, first, end, budget = limit
        pieces = [(max(s.start, first), min(s.end, end)) for s in node.stages if s.node == n]
        pieces = [(a, b) for a, b in pieces if a < b]
        if len(pieces) < 2 and kind == LOAD:
            # The threshold fell since this node was solved: solve it again under the new one.
            return [cons]
        if len(pieces) < 2 or kind == LOAD:
            # Loads are real numbers: a region budget could shrink by tiny steps
            # forever-ish, while "not all of these units here" moves a whole unit.
            lits = self._unit_literals(n, node.assign, cons, weight, budget)
            return list(children(cons, self.p.num_units, lits or []))
        uses = np.array([weight[a:b].sum() for a, b in pieces])
        left_uses = np.cumsum(uses)[:-1]
        i = int(np.argmin(np.abs(left_uses - uses.sum() / 2)))
        cut = (pieces[i][1] + pieces[i + 1][0]) // 2
        left = left_uses[i]
        right = uses.sum() - left
        if kind == MEMORY:
            # Any x in [budget - right, left - 1] excludes the plan from both
            # children; the middle halves the room each time (fewer levels).
            x = (int(budget) - int(right) + int(left) - 1) // 2
            rest = int(budget) - x - 1
        else:
            x = float(left) - (float(uses.sum()) - budget) / 2
            rest = budget - x
        return [
            Constraints(cons.forced, cons.forbidden, cons.forbidden_hops, cons.must_move, cons.budgets | {b})
            for b in ((kind, n, first, cut, x), (kind, n, cut, end, rest))
        ]

    def _link_branch(self, node: Relaxed, cons: Constraints, limit: float) -> list[Constraints] | None:
        links = self._hops(node.stages)
        loads = {k: sum(h[1] for h in v) for k, v in links.items()}
        worst = max(loads, key=loads.get, default=None)
        if worst is None or loads[worst] <= limit:
            return None
        lits = self._hop_literals(worst, links[worst], cons, limit)
        if lits is None:
            return [cons]  # a single hop over the new threshold: solve again under it
        return list(children(cons, self.p.num_units, lits))

    def _unit_literals(self, n: int, assign, cons: Constraints, weight, budget) -> list[Literal] | None:
        pinned = [u for u, m in cons.forced if m == n]
        total = sum(weight[u] for u in pinned)
        free = [
            int(u) for u in np.flatnonzero(assign == n) if (int(u), n) not in cons.forced and weight[u] > 0
        ]
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
        if total > cap:
            return []  # what must move already breaks the cap: nothing under this branch fits
        free = sorted(
            (int(u) for u in moved if int(u) not in fixed and params[u] > 0), key=lambda u: -params[u]
        )
        lits: list[Literal] = []
        for u in free:
            lits.append(("move", u, int(owner[u])))
            total += int(params[u])
            if total > cap:
                return lits
        return None

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

    # -- Lagrangian prices -----------------------------------------------
    def find_prices(self, cons: Constraints, root: Relaxed, share: float = 0.25, rounds: int = 40) -> None:
        """Memory prices that make the relaxation respect node totals better (subgradient ascent).

        Polyak steps towards the incumbent's value; every relaxed plan met on
        the way is offered as a candidate. Only for additive objectives.
        """
        p = self.p
        if p.objective == "throughput":
            return
        stop = time.monotonic() + share * max(self.deadline - time.monotonic(), 0.0)
        prices = np.zeros(p.num_nodes)
        sol, theta, stall = root, 1.0, 0
        for _ in range(rounds):
            if time.monotonic() > stop or self.pruned(max(self.price_bound, root.value)):
                break
            used = np.zeros(p.num_nodes, dtype=np.float64)
            np.add.at(used, sol.assign, self.r.mem.astype(np.float64))
            grad = used - p.memory_bytes
            norm = float(grad @ grad)
            # Aim a little above the best bound so far: an incumbent far from the
            # optimum would make Polyak steps overshoot and the bound collapse.
            floor = max(self.price_bound, root.value)
            target = min(self.best_value, floor + 0.25 * abs(floor) + 1e-12)
            if norm == 0 or target <= sol.value:
                break
            prices = np.maximum(0.0, prices + theta * (target - sol.value) / norm * grad)
            nxt = self.r.solve(cons, None, prices)
            if nxt is None:
                break
            self.offer(nxt.stages)
            if nxt.value > self.price_bound:
                self.price_bound, self.prices, stall = nxt.value, prices.copy(), 0
            else:
                stall += 1
                if stall >= 3:
                    theta, stall = theta / 2, 0
            sol = nxt

    # -- main loop -------------------------------------------------------
    def root_is_enough(self, root_cons: Constraints, root: Relaxed) -> bool:
        """Offer the relaxed root; True when it is already provably optimal (nothing to search)."""
        self.offer(root.stages)
        return self.pruned(max(root.value, self.extra_bound)) or self.branch(root, root_cons) is None

    def run(self, root_cons: Constraints, root: Relaxed) -> SearchOutcome:
        """Branch and bound from the relaxed root (call after offering any heuristic plans)."""
        self.offer(root.stages)
        heap: list = []
        root_bound = max(root.value, self.extra_bound, self.price_bound)
        if not self.pruned(root_bound) and self.branch(root, root_cons) is not None:
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
            kids = self.branch(node, cons)
            if kids is None and self.prices is not None:
                # A priced plan that fits may still cost more than its bound:
                # the plain relaxation decides the node (exact when it fits).
                kids = self._branch_plain(cons, bound)
            if kids is None:
                continue
            for child in kids:
                if time.monotonic() > self.deadline:
                    abandoned = min(abandoned, bound)
                    timed_out = True
                    break
                self._expand(child, bound, depth, heap)
        open_bounds = [b for b, *_ in heap if not self.pruned(b)]
        lowest = min([self.best_value, abandoned, *open_bounds])
        bound = max(lowest, self.extra_bound) if np.isfinite(lowest) else lowest
        optimal = not timed_out or self.pruned(bound)
        log.debug(
            "search: %d nodes, best %.6g, bound %.6g, timed out %s",
            self.nodes,
            self.best_value,
            bound,
            timed_out,
        )
        return SearchOutcome(self.best_stages, self.best_value, bound, optimal, self.nodes, timed_out)

    def _branch_plain(self, cons: Constraints, bound: float) -> list[Constraints] | None:
        plain = self.r.solve(cons, self.threshold())
        self.nodes += 1
        if plain is None:
            return None
        self.offer(plain.stages)
        if self.pruned(max(bound, plain.value)):
            return None
        return self.branch(plain, cons)

    def _expand(self, cons: Constraints, parent_bound: float, depth: int, heap: list) -> None:
        sol = self.r.solve(cons, self.threshold(), self.prices)
        self.nodes += 1
        if sol is None:
            return
        self.offer(sol.stages)
        bound = max(sol.value, parent_bound)
        if not self.pruned(bound):
            heapq.heappush(heap, (bound, depth - 1, next(self._counter), sol, cons))
