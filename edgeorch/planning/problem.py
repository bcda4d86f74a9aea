"""The planning problem as plain arrays: what every planner and the cost model read.

A :class:`Problem` is built once per request (from the pydantic request at the
service edge, or directly by a benchmark) and is read-only afterwards. Nodes
and units are referred to by index inside the planner; ids and names come back
only in the output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

OBJECTIVES = ("latency", "throughput", "energy")


@dataclass(frozen=True)
class Workload:
    """Tokens per request and how many sessions share the KV cache (DESIGN.md §3)."""

    prompt_tokens: int = 64
    generated_tokens: int = 64
    max_sessions: int = 1
    context_tokens: int = 512

    @property
    def tokens(self) -> int:
        """P + G: the tokens every unit processes per request."""
        return self.prompt_tokens + self.generated_tokens


@dataclass(frozen=True, order=True)
class Stage:
    """Units ``[start, end)`` on node index ``node``."""

    node: int
    start: int
    end: int


@dataclass(frozen=True, eq=False)
class Problem:
    """Everything the cost model needs, as numpy arrays indexed by unit and node.

    ``has_link[m, n]`` says whether a directed link m→n exists; a hop between
    stages on the same node needs none. ``current_owner[u]`` is the index of the
    node that holds unit u in the current plan, -1 if that node is no longer
    among ``node_ids`` (it was lost), or the whole array is None without a
    current plan.
    """

    unit_names: tuple[str, ...]
    param_bytes: np.ndarray
    flops_per_token: np.ndarray
    out_bytes_per_token: np.ndarray
    kv_bytes_per_token: np.ndarray
    input_bytes_per_token: float
    result_bytes_per_token: float
    node_ids: tuple[str, ...]
    memory_bytes: np.ndarray
    flops_per_s: np.ndarray
    trusted: np.ndarray
    watts: np.ndarray
    has_link: np.ndarray
    bandwidth_bytes_per_s: np.ndarray
    rtt_s: np.ndarray
    source: int
    workload: Workload = field(default_factory=Workload)
    trusted_units: np.ndarray | None = None
    objective: str = "latency"
    current_stages: tuple[tuple[str, int, int], ...] | None = None
    migration_weight: float = 0.0
    max_migration_bytes: int | None = None
    time_limit_s: float = 1.0
    # Measured prefill speed per node; None: prompt tokens cost what decode tokens do (the
    # planners' model). Only the orchestrator's own predictions set it (cost.evaluate reads it).
    prefill_flops_per_s: np.ndarray | None = None

    @property
    def num_units(self) -> int:
        """Units in the chain (L + 2)."""
        return len(self.unit_names)

    @property
    def num_nodes(self) -> int:
        """Nodes that may host stages."""
        return len(self.node_ids)

    @cached_property
    def unit_memory_bytes(self) -> np.ndarray:
        """Bytes a unit occupies on its node: weights plus KV cache for C·S tokens.

        KV bytes are rounded up to whole bytes so that memory arithmetic stays in
        exact integers everywhere (planner, cost model and oracle agree on ties).
        """
        ctx = self.workload.context_tokens * self.workload.max_sessions
        kv = [math.ceil(float(k) * ctx) for k in self.kv_bytes_per_token]
        return self.param_bytes.astype(np.int64) + np.asarray(kv, dtype=np.int64)

    @cached_property
    def trusted_mask(self) -> np.ndarray:
        """Boolean per unit: must it run on a trusted node."""
        if self.trusted_units is None:
            return np.zeros(self.num_units, dtype=bool)
        return np.asarray(self.trusted_units, dtype=bool)

    @cached_property
    def current_owner(self) -> np.ndarray | None:
        """Node index holding each unit in the current plan (-1: a node now gone)."""
        if self.current_stages is None:
            return None
        index = {nid: i for i, nid in enumerate(self.node_ids)}
        owner = np.full(self.num_units, -1, dtype=np.int64)
        for node_id, start, end in self.current_stages:
            owner[start:end] = index.get(node_id, -1)
        return owner

    @cached_property
    def allowed(self) -> np.ndarray:
        """(U, N) bool: may unit u run on node n as far as privacy goes."""
        allowed = np.ones((self.num_units, self.num_nodes), dtype=bool)
        allowed[self.trusted_mask, :] = self.trusted[None, :]
        return allowed


def build_problem(
    *,
    unit_names: Sequence[str],
    param_bytes: Sequence[int],
    flops_per_token: Sequence[float],
    out_bytes_per_token: Sequence[float],
    kv_bytes_per_token: Sequence[float],
    node_ids: Sequence[str],
    memory_bytes: Sequence[int],
    flops_per_s: Sequence[float],
    trusted: Sequence[bool],
    watts: Sequence[float],
    links: Sequence[tuple[str, str, float, float]],
    source: str,
    input_bytes_per_token: float = 4.0,
    result_bytes_per_token: float = 4.0,
    workload: Workload | None = None,
    trusted_units: Sequence[int] = (),
    objective: str = "latency",
    current_stages: Sequence[tuple[str, int, int]] | None = None,
    migration_weight: float = 0.0,
    max_migration_bytes: int | None = None,
    time_limit_s: float = 1.0,
    default_link: tuple[float, float] | None = None,
) -> Problem:
    """A :class:`Problem` from plain sequences; ``links`` are (src, dst, bandwidth, rtt).

    ``default_link`` (bandwidth, rtt), when given, is every other ordered pair of distinct nodes.

    Inputs are assumed validated (the pydantic request does that at the edge).
    """
    ids = tuple(node_ids)
    index = {nid: i for i, nid in enumerate(ids)}
    has_link, bandwidth, rtt = _link_arrays(index, links, default_link)
    mask = np.zeros(len(unit_names), dtype=bool)
    mask[list(trusted_units)] = True
    return Problem(
        unit_names=tuple(unit_names),
        param_bytes=np.asarray(param_bytes, dtype=np.int64),
        flops_per_token=np.asarray(flops_per_token, dtype=np.float64),
        out_bytes_per_token=np.asarray(out_bytes_per_token, dtype=np.float64),
        kv_bytes_per_token=np.asarray(kv_bytes_per_token, dtype=np.float64),
        input_bytes_per_token=float(input_bytes_per_token),
        result_bytes_per_token=float(result_bytes_per_token),
        node_ids=ids,
        memory_bytes=np.asarray(memory_bytes, dtype=np.int64),
        flops_per_s=np.asarray(flops_per_s, dtype=np.float64),
        trusted=np.asarray(trusted, dtype=bool),
        watts=np.asarray(watts, dtype=np.float64),
        has_link=has_link,
        bandwidth_bytes_per_s=bandwidth,
        rtt_s=rtt,
        source=index[source],
        workload=workload or Workload(),
        trusted_units=mask,
        objective=objective,
        current_stages=tuple(current_stages) if current_stages is not None else None,
        migration_weight=float(migration_weight),
        max_migration_bytes=max_migration_bytes,
        time_limit_s=float(time_limit_s),
    )


def _link_arrays(
    index: dict[str, int], links, default: tuple[float, float] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(has_link, bandwidth, rtt) matrices from (src, dst, bandwidth, rtt) tuples over a default."""
    n = len(index)
    has_link = np.zeros((n, n), dtype=bool)
    bandwidth = np.zeros((n, n), dtype=np.float64)
    rtt = np.zeros((n, n), dtype=np.float64)
    if default is not None:
        off_diagonal = ~np.eye(n, dtype=bool)
        has_link[off_diagonal] = True
        bandwidth[off_diagonal], rtt[off_diagonal] = default
    links = list(links)
    if links:  # vectorised: 16,000 links at 1,000 nodes
        src, dst, bw, r = zip(*links, strict=True)
        i = np.fromiter((index[s] for s in src), dtype=np.intp, count=len(links))
        j = np.fromiter((index[d] for d in dst), dtype=np.intp, count=len(links))
        has_link[i, j] = True
        bandwidth[i, j] = np.asarray(bw, dtype=np.float64)
        rtt[i, j] = np.asarray(r, dtype=np.float64)
    return has_link, bandwidth, rtt


def merge_stages(stages: Sequence[Stage]) -> list[Stage]:
    """Consecutive stages on the same node as one stage (how a plan is reported)."""
    merged: list[Stage] = []
    for s in stages:
        if merged and merged[-1].node == s.node and merged[-1].end == s.start:
            merged[-1] = Stage(s.node, merged[-1].start, s.end)
        else:
            merged.append(s)
    return merged


def stages_from_assignment(assign: Sequence[int]) -> list[Stage]:
    """Maximal runs of a unit→node assignment, as stages."""
    stages: list[Stage] = []
    start = 0
    for u in range(1, len(assign) + 1):
        if u == len(assign) or assign[u] != assign[start]:
            stages.append(Stage(int(assign[start]), start, u))
            start = u
    return stages


def assignment_from_stages(stages: Sequence[Stage], num_units: int) -> np.ndarray:
    """Node index per unit for a plan covering ``[0, num_units)``."""
    assign = np.full(num_units, -1, dtype=np.int64)
    for s in stages:
        assign[s.start : s.end] = s.node
    return assign
