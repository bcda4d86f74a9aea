"""The per-stage relaxation of the planning problem, solved by :mod:`edgeorch.planning.dp`.

:class:`Relaxer` precomputes the cost model's arrays once per problem and then
answers, for a set of branching :class:`Constraints` (units forced onto or kept
off nodes, hops forbidden), the best plan whose *stages* each satisfy memory,
privacy and (for throughput) the load threshold on their own. That plan's
value is a lower bound for every plan meeting the constraints; when it also
satisfies the coupled limits (a node's total memory and load over all its
stages, a link's total load) it is optimal.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np

from edgeorch.planning.cost import tie_weight
from edgeorch.planning.dp import (
    AdditiveTerms,
    BottleneckTerms,
    SlotGraph,
    earliest_start_budget,
    earliest_start_disallowed,
    min_max,
    min_sum,
)
from edgeorch.planning.problem import Problem, Stage, merge_stages

# Slack when a second pass must reproduce the first pass's optimum: the two
# passes compute the same sums in a different order.
REPRODUCE_SLACK = 1e-9


@dataclass(frozen=True)
class Constraints:
    """What a branch of the search has fixed. Hop triples are (boundary, src, dst)."""

    forced: frozenset[tuple[int, int]] = frozenset()
    forbidden: frozenset[tuple[int, int]] = frozenset()
    forbidden_hops: frozenset[tuple[int, int, int]] = frozenset()
    must_move: frozenset[int] = frozenset()
    # (resource, node, first unit, end unit, budget): what the node may use of
    # the resource within that unit range. Resource MEMORY is in bytes, LOAD in
    # seconds of compute per token.
    budgets: frozenset[tuple[int, int, int, int, float]] = frozenset()


MEMORY, LOAD = 0, 1


def region_lo(prefix: np.ndarray, first: int, end: int, budget: float) -> np.ndarray:
    """(U+1,) earliest stage start so that the stage's part inside [first, end) stays in budget.

    The part of stage [a, b) inside the region is [max(a, first), min(b, end));
    it only grows as a decreases, so one lower limit per b says it all.
    """
    b = np.arange(len(prefix))
    e = np.minimum(b, end)
    over = (b > first) & (prefix[e] - prefix[first] > budget)
    start = np.searchsorted(prefix, prefix[e] - budget, side="left")
    return np.where(over, start, 0)


@dataclass(frozen=True)
class Relaxed:
    """A relaxed optimum: its value (a lower bound) and its plan."""

    value: float
    stages: tuple[Stage, ...]
    assign: np.ndarray


def _prefix(values: np.ndarray) -> np.ndarray:
    out = np.zeros((values.shape[0] + 1, *values.shape[1:]), dtype=values.dtype)
    np.cumsum(values, axis=0, out=out[1:])
    return out


class Relaxer:
    """Builds and solves the per-stage relaxation for one problem."""

    def __init__(self, problem: Problem, restrict: np.ndarray | None = None):
        """Precompute the problem's arrays; ``restrict`` (U, N) further limits where units may go."""
        p = problem
        self.problem = p
        n_nodes, n_units = p.num_nodes, p.num_units
        self.mem = p.unit_memory_bytes
        self.mem_prefix = _prefix(self.mem)
        self.flops_prefix = _prefix(p.flops_per_token)
        self.load_prefix = self.flops_prefix[:, None] / p.flops_per_s[None, :]
        self.trans_ok = p.has_link & ~np.eye(n_nodes, dtype=bool)
        bw = p.bandwidth_bytes_per_s
        self.hop_load = np.divide(1.0, bw, out=np.zeros_like(bw), where=p.has_link)
        self.bytes_at = np.empty(n_units + 1)
        self.bytes_at[0] = p.input_bytes_per_token
        self.bytes_at[1:n_units] = p.out_bytes_per_token[: n_units - 1]
        self.bytes_at[n_units] = p.result_bytes_per_token
        src = p.source
        is_src = np.arange(n_nodes) == src
        self.entry_linked = p.has_link[src] | is_src
        self.exit_linked = p.has_link[:, src] | is_src
        self.entry_load = np.where(is_src, 0.0, self.hop_load[src] * p.input_bytes_per_token)
        self.exit_load = np.where(is_src, 0.0, self.hop_load[:, src] * p.result_bytes_per_token)
        # A unit larger than a node's whole memory can never go there; saying so
        # up front tightens every later bound for free.
        self.base_allowed = p.allowed & (self.mem[:, None] <= p.memory_bytes[None, :])
        if restrict is not None:
            self.base_allowed &= restrict
        self.lo_memory_root = earliest_start_budget(self.mem_prefix, p.memory_bytes)
        self.lo_allowed = earliest_start_disallowed(self.base_allowed)
        # next_disallowed[a, n]: first unit at or after a that node n may not run (U if none).
        bad = np.where(~self.base_allowed, np.arange(n_units)[:, None], n_units)
        self.next_disallowed = np.vstack(
            [np.minimum.accumulate(bad[::-1], axis=0)[::-1], np.full((1, n_nodes), n_units)]
        )
        self.latency_terms = self._additive_terms(with_objective=False)
        plain_latency = p.objective == "latency" and not (
            p.current_owner is not None and p.migration_weight > 0
        )
        # The same terms when the objective is latency alone (N x N arrays: 1,000 nodes, a million each).
        self.objective_terms = (
            self.latency_terms if plain_latency else self._additive_terms(with_objective=True)
        )

    def _additive_terms(self, with_objective: bool) -> AdditiveTerms:
        """Latency terms, or the objective's (energy with its tie-break, plus migration)."""
        p = self.problem
        w = p.workload
        fixed = np.where(p.has_link, (1 + w.generated_tokens) * p.rtt_s / 2, 0.0)
        per_byte = w.tokens * self.hop_load
        src = p.source
        is_src = np.arange(p.num_nodes) == src
        entry = np.where(is_src, 0.0, fixed[src] + per_byte[src] * p.input_bytes_per_token)
        exit_ = np.where(is_src, 0.0, fixed[:, src] + per_byte[:, src] * p.result_bytes_per_token)
        unit_cost = w.tokens * p.flops_per_token[:, None] / p.flops_per_s[None, :]
        hop_scale = 1.0
        if with_objective and p.objective == "energy":
            eps = tie_weight(p)
            unit_cost = unit_cost * (p.watts[None, :] + eps)
            hop_scale = eps
        owner = p.current_owner
        if with_objective and owner is not None and p.migration_weight > 0:
            moved = np.arange(p.num_nodes)[None, :] != owner[:, None]
            unit_cost = unit_cost + p.migration_weight * p.param_bytes[:, None] * moved
        return AdditiveTerms(
            cost_prefix=_prefix(unit_cost),
            hop_fixed=fixed * hop_scale,
            hop_per_byte=per_byte * hop_scale,
            entry_cost=entry * hop_scale,
            exit_cost=exit_ * hop_scale,
        )

    def root_forced(self) -> frozenset[tuple[int, int]]:
        """Units that only one node may run (typically trusted units, one trusted node)."""
        counts = self.base_allowed.sum(axis=1)
        return frozenset((int(u), int(np.argmax(self.base_allowed[u]))) for u in np.flatnonzero(counts == 1))

    def allowed_under(self, cons: Constraints) -> np.ndarray | None:
        """(U, N) allowed placements under the constraints; None if contradictory."""
        allowed = self.base_allowed.copy()
        for u, n in cons.forbidden:
            allowed[u, n] = False
        for u, n in cons.forced:
            if not allowed[u, n]:
                return None
            allowed[u, :] = False
            allowed[u, n] = True
        return allowed

    def _forced_by_node(self, cons: Constraints) -> dict[int, list[int]]:
        by_node: dict[int, list[int]] = defaultdict(list)
        for u, n in cons.forced:
            by_node[n].append(u)
        return by_node

    def _memory_lo(self, forced: dict[int, list[int]]) -> np.ndarray:
        """Stage starts allowed by memory, counting units forced elsewhere on the same node."""
        lo = self.lo_memory_root
        if not forced:
            return lo
        lo = lo.copy()
        cap = self.problem.memory_bytes
        for n, units in forced.items():
            inside = np.zeros_like(self.mem)
            inside[units] = self.mem[units]
            g = self.mem_prefix - _prefix(inside)
            budget = np.array([cap[n] - int(inside.sum())], dtype=np.int64)
            lo[:, n] = earliest_start_budget(g, budget)[:, 0]
        return lo

    def _load_lo(self, forced: dict[int, list[int]], limit: float) -> np.ndarray:
        """Stage starts allowed by the per-token load limit, with forced units counted."""
        fps = self.problem.flops_per_s
        lo = earliest_start_budget(self.flops_prefix, limit * fps)
        flops = self.problem.flops_per_token
        for n, units in forced.items():
            inside = np.zeros_like(flops)
            inside[units] = flops[units]
            g = self.flops_prefix - _prefix(inside)
            lo[:, n] = earliest_start_budget(g, np.array([limit * fps[n] - inside.sum()]))[:, 0]
        return lo

    def graph(self, cons: Constraints, limit: float | None) -> tuple[SlotGraph, np.ndarray, dict] | None:
        """The DP graph under ``cons`` (and a load limit), with its memory-only starts and forced units."""
        allowed = self.allowed_under(cons)
        if allowed is None:
            return None
        forced = self._forced_by_node(cons)
        lo = np.maximum(earliest_start_disallowed(allowed), self._memory_lo(forced))
        if cons.budgets:
            lo = lo.copy()
            fps = self.problem.flops_per_s
            for kind, n, first, end, budget in cons.budgets:
                prefix, amount = (
                    (self.mem_prefix, budget) if kind == MEMORY else (self.flops_prefix, budget * fps[n])
                )
                lo[:, n] = np.maximum(lo[:, n], region_lo(prefix, first, end, amount))
        base_lo = lo
        if limit is not None:
            lo = np.maximum(lo, self._load_lo(forced, limit))
        hops: dict[int, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
        for a, m, n in cons.forbidden_hops:
            hops[a][0].append(m)
            hops[a][1].append(n)
        graph = SlotGraph(
            lo=lo,
            trans_ok=self.trans_ok,
            entry_ok=self.entry_linked if limit is None else self.entry_linked & (self.entry_load <= limit),
            exit_ok=self.exit_linked if limit is None else self.exit_linked & (self.exit_load <= limit),
            bytes_at=self.bytes_at,
            hop_load=self.hop_load,
            hop_limit=limit,
            forbidden_hops={a: (np.array(s), np.array(d)) for a, (s, d) in hops.items()},
        )
        return graph, base_lo, forced

    def solve(
        self, cons: Constraints, limit: float | None = None, prices: np.ndarray | None = None
    ) -> Relaxed | None:
        """The relaxed optimum under ``cons``; ``limit`` caps every stage and hop load (throughput).

        ``prices`` (additive objectives) charge each node per byte of memory it
        uses and credit it its whole memory: for any price vector >= 0 the
        result is still a lower bound on every feasible plan (Lagrangian
        relaxation of the memory totals), and a much better one when the
        prices make overfull nodes expensive.
        """
        built = self.graph(cons, limit)
        if built is None:
            return None
        graph, base_lo, forced = built
        if self.problem.objective != "throughput":
            terms = self.objective_terms
            credit = 0.0
            if prices is not None:
                terms = replace(
                    terms, cost_prefix=terms.cost_prefix + self.mem_prefix[:, None] * prices[None, :]
                )
                credit = float(prices @ self.problem.memory_bytes)
            path = min_sum(graph, terms)
            return None if path is None else self._result(path.value - credit, path.stages)
        bottleneck = BottleneckTerms(self.load_prefix, self.entry_load, self.exit_load)
        path = min_max(graph, bottleneck)
        if path is None:
            return None
        # Among the paths with this bottleneck, the one of least latency: fewer
        # pointless hops, so fewer coupled violations for the search to undo.
        second = path.value * (1 + REPRODUCE_SLACK)
        if limit is not None:
            second = min(second, limit)
        graph.lo = np.maximum(base_lo, self._load_lo(forced, second))
        graph.hop_limit = second
        graph.entry_ok = self.entry_linked & (self.entry_load <= second)
        graph.exit_ok = self.exit_linked & (self.exit_load <= second)
        tidy = min_sum(graph, self.latency_terms)
        return self._result(path.value, (tidy or path).stages)

    def _result(self, value: float, slot_stages: list[tuple[int, int, int]], slots=None) -> Relaxed:
        stages = [Stage(int(slots[k]) if slots is not None else k, a, b) for k, a, b in slot_stages]
        merged = merge_stages(stages)
        assign = np.empty(self.problem.num_units, dtype=np.int64)
        for s in merged:
            assign[s.start : s.end] = s.node
        return Relaxed(value, tuple(merged), assign)
