"""Dynamic programmes over (unit boundary, slot): the planner's exact relaxation.

A *slot* is a node, or a copy of one (a heuristic gives the source two slots
so that it can host a prefix and a suffix). A path through the programme is a
sequence of stages, each a unit range on one slot; consecutive stages must be
on slots of different nodes joined by a link. Every stage is checked on its
own (memory, privacy, a load threshold) through ``lo``: a stage ending at
boundary b on slot k may start at any a with ``lo[b, k] <= a < b``. All those
per-stage checks are monotone in a (a longer stage only uses more), which is
what makes a single lower limit enough.

Two objectives are supported: an additive one (latency, energy) and a
bottleneck one (the throughput bound, per stage and per hop). Both are exact
over their paths; what they do not see is a node's *total* use when it hosts
several stages, which the branch and bound in :mod:`edgeorch.planning.search`
adds back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

INF = np.inf


@dataclass
class SlotGraph:
    """Which stages and transitions a path may use.

    ``lo``: (U+1, K) earliest start of a stage ending at each boundary (row 0
    unused). ``trans_ok``: (K, K) static transitions. ``forbidden_hops``: per
    boundary a, the (src slots, dst slots) pairs a path may not use there.
    ``hop_limit``: hops whose per-token link load exceeds it are forbidden
    (``hop_load`` is the per-byte load matrix and ``bytes_at`` what crosses
    each boundary).
    """

    lo: np.ndarray
    trans_ok: np.ndarray
    entry_ok: np.ndarray
    exit_ok: np.ndarray
    bytes_at: np.ndarray
    hop_load: np.ndarray
    hop_limit: float | None = None
    forbidden_hops: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def num_units(self) -> int:
        """Units in the chain."""
        return self.lo.shape[0] - 1

    def blocked(self, a: int) -> np.ndarray:
        """(K, K) transitions that may not be used at boundary a."""
        blocked = ~self.trans_ok
        extra = self.forbidden_hops.get(a)
        if extra is not None or self.hop_limit is not None:
            blocked = blocked.copy()
        if extra is not None:
            blocked[extra[0], extra[1]] = True
        if self.hop_limit is not None:
            blocked |= self.hop_load * self.bytes_at[a] > self.hop_limit
        return blocked


@dataclass
class AdditiveTerms:
    """Costs of an additive objective: per-unit prefix sums and per-hop costs."""

    cost_prefix: np.ndarray
    hop_fixed: np.ndarray
    hop_per_byte: np.ndarray
    entry_cost: np.ndarray
    exit_cost: np.ndarray


@dataclass
class BottleneckTerms:
    """Per-token loads: per-unit prefix sums per slot, per-byte link loads."""

    load_prefix: np.ndarray
    entry_load: np.ndarray
    exit_load: np.ndarray


@dataclass
class DpPath:
    """The best path: its value and its stages as (slot, start, end)."""

    value: float
    stages: list[tuple[int, int, int]]


def _backtrack(start_arg: np.ndarray, enter_arg: np.ndarray, last: int, num_units: int) -> list:
    stages = []
    b, k = num_units, last
    while True:
        a = int(start_arg[b, k])
        stages.append((k, a, b))
        if a == 0:
            break
        k, b = int(enter_arg[a, k]), a
    stages.reverse()
    return stages


def min_sum(graph: SlotGraph, terms: AdditiveTerms) -> DpPath | None:
    """The path of least total cost, or None when no path satisfies the graph.

    ``enter[a, k]`` is the cheapest way to reach boundary a with the next stage
    on slot k (hop included); ``dp_end[b, k]`` the cheapest prefix whose last
    stage ends at b on k. The stage cost is a difference of prefix sums, so the
    inner minimum over starts is one vectorised min per boundary.
    """
    u_count = graph.num_units
    cost = terms.cost_prefix
    k_count = cost.shape[1]
    cols = np.arange(k_count)
    rows = np.arange(u_count)[:, None]
    dp_end = np.full((u_count + 1, k_count), INF)
    start_arg = np.zeros((u_count + 1, k_count), dtype=np.int64)
    enter = np.full((u_count, k_count), INF)
    enter_arg = np.zeros((u_count, k_count), dtype=np.int64)
    enter[0] = np.where(graph.entry_ok, terms.entry_cost, INF)
    for b in range(1, u_count + 1):
        a = b - 1
        if a >= 1 and np.isfinite(dp_end[a]).any():
            hop = np.where(graph.blocked(a), INF, terms.hop_fixed + terms.hop_per_byte * graph.bytes_at[a])
            total = dp_end[a][:, None] + hop
            best = np.argmin(total, axis=0)
            enter[a] = total[best, cols]
            enter_arg[a] = best
        x = enter[:b] - cost[:b]
        x[rows[:b] < graph.lo[b][None, :]] = INF
        best = np.argmin(x, axis=0)
        dp_end[b] = x[best, cols] + cost[b]
        start_arg[b] = best
    final = dp_end[u_count] + np.where(graph.exit_ok, terms.exit_cost, INF)
    last = int(np.argmin(final))
    if not np.isfinite(final[last]):
        return None
    return DpPath(float(final[last]), _backtrack(start_arg, enter_arg, last, u_count))


def min_max(graph: SlotGraph, terms: BottleneckTerms) -> DpPath | None:
    """The path whose largest single stage or hop load is least (a bottleneck path).

    Same recurrence as :func:`min_sum` with (max, min) in place of (+, min),
    which is exact for bottleneck paths because max is monotone.
    """
    u_count = graph.num_units
    load = terms.load_prefix
    k_count = load.shape[1]
    cols = np.arange(k_count)
    rows = np.arange(u_count)[:, None]
    dp_end = np.full((u_count + 1, k_count), INF)
    start_arg = np.zeros((u_count + 1, k_count), dtype=np.int64)
    enter = np.full((u_count, k_count), INF)
    enter_arg = np.zeros((u_count, k_count), dtype=np.int64)
    enter[0] = np.where(graph.entry_ok, terms.entry_load, INF)
    for b in range(1, u_count + 1):
        a = b - 1
        if a >= 1 and np.isfinite(dp_end[a]).any():
            hop = np.where(graph.blocked(a), INF, graph.hop_load * graph.bytes_at[a])
            total = np.maximum(dp_end[a][:, None], hop)
            best = np.argmin(total, axis=0)
            enter[a] = total[best, cols]
            enter_arg[a] = best
        x = np.maximum(enter[:b], load[b] - load[:b])
        x[rows[:b] < graph.lo[b][None, :]] = INF
        best = np.argmin(x, axis=0)
        dp_end[b] = x[best, cols]
        start_arg[b] = best
    final = np.maximum(dp_end[u_count], np.where(graph.exit_ok, terms.exit_load, INF))
    last = int(np.argmin(final))
    if not np.isfinite(final[last]):
        return None
    return DpPath(float(final[last]), _backtrack(start_arg, enter_arg, last, u_count))


def earliest_start_disallowed(allowed: np.ndarray) -> np.ndarray:
    """(U+1, K) lower limit on a stage's start from units a slot may not run.

    A stage ending at b must start after the last unit before b that the slot
    may not run.
    """
    u_count, k_count = allowed.shape
    idx = np.where(~allowed, np.arange(u_count)[:, None], -1)
    last_bad = np.maximum.accumulate(idx, axis=0)
    lo = np.zeros((u_count + 1, k_count), dtype=np.int64)
    lo[1:] = last_bad + 1
    return lo


def earliest_start_budget(prefix: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """(U+1, K) lower limit on a stage's start so that its sum stays within budget.

    ``prefix`` (U+1,) is nondecreasing; a stage [a, b) on slot k fits when
    ``prefix[b] - prefix[a] <= budget[k]``, i.e. a is at least the first index
    whose prefix reaches ``prefix[b] - budget[k]``.
    """
    need = prefix[:, None] - budget[None, :]
    return np.searchsorted(prefix, need.ravel(), side="left").reshape(need.shape).astype(np.int64)
