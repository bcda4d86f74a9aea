"""The cost model of DESIGN.md §3, evaluated plainly on one plan.

This is the reference every planner is judged by: the optimal planner's fast
recurrences are checked against :func:`evaluate`, and every plan leaves the
library only after :func:`violations` found nothing wrong with it. It is
written as straightforward loops on purpose.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgeorch.planning.errors import Cause
from edgeorch.planning.formats import (
    ACTIVATION_FORMATS,
    DEFAULT_MIN_GAIN,
    DEFAULT_QUALITY_BUDGET,
    HopLink,
    choose_hop_formats,
    convert_s_per_token,
)
from edgeorch.planning.formats import bytes_per_token as format_bytes_per_token
from edgeorch.planning.problem import Problem, Stage, assignment_from_stages, merge_stages


@dataclass(frozen=True)
class StageCost:
    """Predicted figures of one (merged) stage."""

    stage: Stage
    compute_s: float
    memory_bytes: int
    load_s_per_token: float
    energy_j: float


@dataclass(frozen=True)
class HopCost:
    """Predicted figures of one hop. ``boundary`` 0 is the entry hop, U the exit hop.

    ``format``: how its activations travel (edgeorch.planning.formats); the
    entry and exit hops carry token ids and are always ``fp32``.
    """

    src: int
    dst: int
    boundary: int
    bytes_per_token: float
    transfer_s: float
    load_s_per_token: float
    linked: bool
    format: str = "fp32"


@dataclass(frozen=True)
class Evaluation:
    """Every figure the cost model predicts for a plan."""

    stages: tuple[StageCost, ...]
    hops: tuple[HopCost, ...]
    latency_s: float
    energy_j: float
    bottleneck_s_per_token: float
    node_memory_bytes: np.ndarray
    node_load_s_per_token: np.ndarray
    link_load_s_per_token: dict[tuple[int, int], float]
    migration_bytes: int
    moved_units: tuple[int, ...]

    @property
    def throughput_tokens_per_s(self) -> float | None:
        """Pipelined tokens/s; None when nothing bounds it (no compute, no hops)."""
        return 1.0 / self.bottleneck_s_per_token if self.bottleneck_s_per_token > 0 else None


def hop_cost(
    problem: Problem, src: int, dst: int, boundary: int, bytes_per_token: float, fmt: str = "fp32"
) -> HopCost:
    """One hop: (1 + G)·rtt/2 + (P + G)·(bytes/bandwidth + conversion); same-node hops cost nothing.

    ``bytes_per_token`` is the fp32 figure of the profile; a lossy ``fmt``
    sends its own bytes for the same hidden state and adds its conversion.
    """
    if src == dst:
        return HopCost(src, dst, boundary, bytes_per_token, 0.0, 0.0, True)
    convert = 0.0
    if fmt != "fp32":
        hidden = int(bytes_per_token) // 4  # fp32 elements per token
        bytes_per_token, convert = (
            float(format_bytes_per_token(fmt, hidden)),
            convert_s_per_token(fmt, hidden),
        )
    if not problem.has_link[src, dst]:
        return HopCost(src, dst, boundary, bytes_per_token, float("inf"), float("inf"), False, fmt)
    w = problem.workload
    bw = float(problem.bandwidth_bytes_per_s[src, dst])
    per_token = bytes_per_token / bw + convert
    transfer = (1 + w.generated_tokens) * float(problem.rtt_s[src, dst]) / 2 + w.tokens * per_token
    return HopCost(src, dst, boundary, bytes_per_token, transfer, per_token, True, fmt)


def plan_hops(
    problem: Problem, stages: Sequence[Stage], formats: Mapping[int, str] | None = None
) -> list[HopCost]:
    """The entry hop, the hops between stages on different nodes, and the exit hop.

    ``formats``: the activation format of the hop into the stage that starts
    at each boundary unit (absent: fp32).
    """
    src = problem.source
    formats = formats or {}
    hops = [hop_cost(problem, src, stages[0].node, 0, problem.input_bytes_per_token)]
    for prev, cur in zip(stages, stages[1:], strict=False):
        out = float(problem.out_bytes_per_token[prev.end - 1])
        hops.append(hop_cost(problem, prev.node, cur.node, cur.start, out, formats.get(cur.start, "fp32")))
    hops.append(hop_cost(problem, stages[-1].node, src, problem.num_units, problem.result_bytes_per_token))
    return [h for h in hops if h.src != h.dst]


def _check_cover(problem: Problem, stages: Sequence[Stage]) -> None:
    pos = 0
    for s in stages:
        if s.start != pos or s.end <= s.start or not 0 <= s.node < problem.num_nodes:
            raise ValueError(f"stages do not tile the unit chain at unit {pos}: {stages}")
        pos = s.end
    if pos != problem.num_units:
        raise ValueError(f"stages end at {pos}, the chain has {problem.num_units} units")


def evaluate(
    problem: Problem, stages: Sequence[Stage], formats: Mapping[int, str] | None = None
) -> Evaluation:
    """Latency, throughput, energy, memory and migration of a plan (stages are merged first).

    ``formats``: activation format per boundary unit (see :func:`plan_hops`); fp32 everywhere by default.
    """
    _check_cover(problem, stages)
    stages = merge_stages(stages)
    tokens = problem.workload.tokens
    mem = problem.unit_memory_bytes
    node_mem = np.zeros(problem.num_nodes, dtype=np.int64)
    node_load = np.zeros(problem.num_nodes, dtype=np.float64)
    stage_costs = []
    prefill = problem.prefill_flops_per_s
    w = problem.workload
    for s in stages:
        flops = float(np.sum(problem.flops_per_token[s.start : s.end]))
        load = flops / float(problem.flops_per_s[s.node])
        compute = tokens * load
        if prefill is not None:  # the prompt at the measured prefill speed, the rest at decode speed
            compute = w.prompt_tokens * flops / float(prefill[s.node]) + w.generated_tokens * load
        used = int(np.sum(mem[s.start : s.end]))
        node_mem[s.node] += used
        node_load[s.node] += load
        stage_costs.append(StageCost(s, compute, used, load, compute * float(problem.watts[s.node])))
    hops = plan_hops(problem, stages, formats)
    links: dict[tuple[int, int], float] = {}
    for h in hops:
        links[(h.src, h.dst)] = links.get((h.src, h.dst), 0.0) + h.load_s_per_token
    bottleneck = max([0.0, *node_load.tolist(), *links.values()])
    moved, moved_bytes = _migration(problem, stages)
    return Evaluation(
        stages=tuple(stage_costs),
        hops=tuple(hops),
        latency_s=sum(c.compute_s for c in stage_costs) + sum(h.transfer_s for h in hops),
        energy_j=sum(c.energy_j for c in stage_costs),
        bottleneck_s_per_token=bottleneck,
        node_memory_bytes=node_mem,
        node_load_s_per_token=node_load,
        link_load_s_per_token=links,
        migration_bytes=moved_bytes,
        moved_units=moved,
    )


def plan_formats(
    problem: Problem,
    stages: Sequence[Stage],
    allowed: Sequence[str] = ACTIVATION_FORMATS,
    quality_budget: float = DEFAULT_QUALITY_BUDGET,
    min_gain: float = DEFAULT_MIN_GAIN,
    current: Mapping[int, str] | None = None,
) -> dict[int, str]:
    """The activation format of every hop between two nodes of a plan, chosen from its links' bandwidth.

    Keyed by the boundary unit the hop leads into (the stage that starts
    there receives it); ``current``: the formats the hops carry now (for the
    hysteresis). See :func:`edgeorch.planning.formats.choose_hop_formats`.
    """
    stages = merge_stages(stages)
    base = evaluate(problem, stages)
    links = [
        HopLink(h.boundary, int(h.bytes_per_token) // 4, float(problem.bandwidth_bytes_per_s[h.src, h.dst]))
        for h in base.hops
        if 0 < h.boundary < problem.num_units and h.linked
    ]
    return choose_hop_formats(
        links, problem.workload.tokens, base.latency_s, allowed, quality_budget, min_gain, current
    )


def _migration(problem: Problem, stages: Sequence[Stage]) -> tuple[tuple[int, ...], int]:
    """Units that land on a node that does not hold them now, and their parameter bytes."""
    owner = problem.current_owner
    if owner is None:
        return (), 0
    assign = assignment_from_stages(stages, problem.num_units)
    moved = tuple(int(u) for u in np.flatnonzero(assign != owner))
    return moved, int(sum(int(problem.param_bytes[u]) for u in moved))


def tie_weight(problem: Problem) -> float:
    """Weight of latency in the energy objective, only to break exact ties.

    Hops cost no energy, so many plans tie; among them the planner prefers the
    lower latency. 1e-12 of the largest power draw keeps the effect on the
    energy figure itself far below any tolerance anyone compares with.
    """
    top = float(np.max(problem.watts)) if problem.num_nodes else 0.0
    return 1e-12 * top if top > 0 else 1.0


def score(problem: Problem, ev: Evaluation) -> float:
    """The number the optimal planner minimises for the problem's objective."""
    if problem.objective == "throughput":
        return ev.bottleneck_s_per_token
    migration = problem.migration_weight * ev.migration_bytes
    if problem.objective == "energy":
        return ev.energy_j + tie_weight(problem) * ev.latency_s + migration
    return ev.latency_s + migration


def violations(problem: Problem, stages: Sequence[Stage]) -> list[Cause]:
    """Every constraint of DESIGN.md §3 the plan breaks (empty when it is feasible)."""
    ev = evaluate(problem, stages)
    ids = problem.node_ids
    causes: list[Cause] = []
    over = {
        ids[n]: int(ev.node_memory_bytes[n] - problem.memory_bytes[n])
        for n in range(problem.num_nodes)
        if ev.node_memory_bytes[n] > problem.memory_bytes[n]
    }
    if over:
        text = ", ".join(f"{k} by {v} bytes" for k, v in over.items())
        causes.append(
            Cause("memory", f"nodes short of memory: {text}", nodes=tuple(over), short_by_bytes=over)
        )
    assign = assignment_from_stages(stages, problem.num_units)
    bad = [u for u in np.flatnonzero(problem.trusted_mask) if not problem.trusted[assign[u]]]
    if bad:
        causes.append(
            Cause(
                "untrusted_host",
                f"trusted units {bad} placed on untrusted nodes",
                nodes=tuple(sorted({ids[assign[u]] for u in bad})),
                units=tuple(int(u) for u in bad),
            )
        )
    missing = sorted({(ids[h.src], ids[h.dst]) for h in ev.hops if not h.linked})
    if missing:
        text = ", ".join(f"{a}->{b}" for a, b in missing)
        causes.append(
            Cause("missing_link", f"plan needs links that do not exist: {text}", links=tuple(missing))
        )
    cap = problem.max_migration_bytes
    if cap is not None and ev.migration_bytes > cap:
        causes.append(
            Cause(
                "migration_cap",
                f"plan moves {ev.migration_bytes} bytes of weights, the cap is {cap}",
                units=ev.moved_units,
            )
        )
    return causes
