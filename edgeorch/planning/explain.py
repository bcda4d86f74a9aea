"""Explain a plan: per-stage compute and memory, per-hop transfer, and what limits it.

This is where the cost model's figures become the response's pydantic
models (the library's boundary); the figures themselves all come from
:func:`edgeorch.planning.cost.evaluate`.
"""

from __future__ import annotations

import numpy as np

from edgeorch.planning.cost import Evaluation
from edgeorch.planning.diagnose import usable_nodes
from edgeorch.planning.errors import Cause
from edgeorch.planning.problem import Problem
from edgeorch.schemas.plan import (
    Bottleneck,
    CauseReport,
    Explanation,
    HopReport,
    NodeReport,
    Predicted,
    StageReport,
)

# A node whose memory is this full counts as a binding constraint.
TIGHT_MEMORY = 0.95


def predicted(ev: Evaluation) -> Predicted:
    """The three objectives (and the bottleneck time) of an evaluation."""
    return Predicted(
        latency_s=ev.latency_s,
        throughput_tokens_per_s=ev.throughput_tokens_per_s,
        energy_j=ev.energy_j,
        bottleneck_s_per_token=ev.bottleneck_s_per_token,
    )


def cause_report(cause: Cause) -> CauseReport:
    """A domain cause as the API's model."""
    return CauseReport(
        kind=cause.kind,
        message=cause.message,
        nodes=list(cause.nodes),
        units=list(cause.units),
        links=list(cause.links),
        short_by_bytes=dict(cause.short_by_bytes),
    )


def _throughput_bottleneck(problem: Problem, ev: Evaluation) -> Bottleneck:
    ids = problem.node_ids
    n = int(np.argmax(ev.node_load_s_per_token))
    node_load = float(ev.node_load_s_per_token[n])
    link = max(ev.link_load_s_per_token, key=ev.link_load_s_per_token.get, default=None)
    link_load = ev.link_load_s_per_token.get(link, 0.0) if link else 0.0
    if node_load <= 0 and link_load <= 0:
        return Bottleneck(
            kind="none", subject="", value=0.0, unit="s/token", message="nothing limits throughput"
        )
    if link is not None and link_load > node_load:
        name = f"{ids[link[0]]}->{ids[link[1]]}"
        text = f"link {name} carries {link_load:.3g} s of transfer per token, more than any node computes"
        return Bottleneck(kind="link_transfer", subject=name, value=link_load, unit="s/token", message=text)
    text = f"node {ids[n]} computes {node_load:.3g} s per token over all its stages, the most of any resource"
    return Bottleneck(kind="node_compute", subject=ids[n], value=node_load, unit="s/token", message=text)


def _latency_bottleneck(problem: Problem, ev: Evaluation) -> Bottleneck:
    ids = problem.node_ids
    compute: dict[str, float] = {}
    for c in ev.stages:
        compute[ids[c.stage.node]] = compute.get(ids[c.stage.node], 0.0) + c.compute_s
    transfer: dict[str, float] = {}
    for h in ev.hops:
        name = f"{ids[h.src]}->{ids[h.dst]}"
        transfer[name] = transfer.get(name, 0.0) + h.transfer_s
    node = max(compute, key=compute.get)
    link = max(transfer, key=transfer.get, default=None)
    total = ev.latency_s or 1.0
    if link is not None and transfer[link] > compute[node]:
        share = transfer[link] / total
        text = f"transfers on link {link} take {transfer[link]:.3g} s ({share:.0%} of the latency)"
        return Bottleneck(kind="link_transfer", subject=link, value=transfer[link], unit="s", message=text)
    share = compute[node] / total
    text = f"compute on node {node} takes {compute[node]:.3g} s ({share:.0%} of the latency)"
    return Bottleneck(kind="node_compute", subject=node, value=compute[node], unit="s", message=text)


def _energy_bottleneck(problem: Problem, ev: Evaluation) -> Bottleneck:
    per_node: dict[str, float] = {}
    for c in ev.stages:
        name = problem.node_ids[c.stage.node]
        per_node[name] = per_node.get(name, 0.0) + c.energy_j
    node = max(per_node, key=per_node.get)
    share = per_node[node] / ev.energy_j if ev.energy_j > 0 else 0.0
    text = f"node {node} spends {per_node[node]:.3g} J ({share:.0%} of the energy)"
    return Bottleneck(kind="node_compute", subject=node, value=per_node[node], unit="J", message=text)


def binding_constraints(problem: Problem, ev: Evaluation) -> list[str]:
    """Constraints that shape the plan: full memory, privacy pins, cut-off nodes, the migration cap."""
    ids = problem.node_ids
    notes = []
    for n in sorted({c.stage.node for c in ev.stages}):
        used, cap = int(ev.node_memory_bytes[n]), int(problem.memory_bytes[n])
        if cap > 0 and used >= TIGHT_MEMORY * cap:
            notes.append(f"memory of node {ids[n]} is {used / cap:.0%} used ({used} of {cap} bytes)")
    pinned = [int(u) for u in np.flatnonzero(problem.trusted_mask)]
    if pinned:
        hosts = [ids[n] for n in np.flatnonzero(problem.trusted)]
        notes.append(f"trusted units {pinned} may only run on trusted nodes {hosts}")
    cut_off = [ids[n] for n in np.flatnonzero(~usable_nodes(problem))]
    if cut_off:
        notes.append(f"nodes {cut_off} are unreachable from the source {ids[problem.source]} and back")
    cap = problem.max_migration_bytes
    if cap is not None and problem.current_stages is not None and ev.migration_bytes >= TIGHT_MEMORY * cap:
        notes.append(f"migration cap: {ev.migration_bytes} of {cap} bytes of weights move")
    return notes


def explain(problem: Problem, ev: Evaluation) -> Explanation:
    """Per-stage, per-hop and per-node figures, the objective's bottleneck and binding constraints."""
    ids = problem.node_ids
    stages = [
        StageReport(
            node=ids[c.stage.node],
            start=c.stage.start,
            end=c.stage.end,
            compute_s=c.compute_s,
            load_s_per_token=c.load_s_per_token,
            memory_bytes=c.memory_bytes,
            energy_j=c.energy_j,
        )
        for c in ev.stages
    ]
    u_count = problem.num_units
    hops = [
        HopReport(
            src=ids[h.src],
            dst=ids[h.dst],
            kind="entry" if h.boundary == 0 else "exit" if h.boundary == u_count else "internal",
            after_unit=h.boundary - 1 if 0 < h.boundary < u_count else None,
            bytes_per_token=h.bytes_per_token,
            transfer_s=h.transfer_s,
            load_s_per_token=h.load_s_per_token,
        )
        for h in ev.hops
    ]
    nodes = [
        NodeReport(
            node=ids[n],
            memory_bytes=int(ev.node_memory_bytes[n]),
            memory_capacity_bytes=int(problem.memory_bytes[n]),
            load_s_per_token=float(ev.node_load_s_per_token[n]),
            energy_j=sum(c.energy_j for c in ev.stages if c.stage.node == n),
        )
        for n in sorted({c.stage.node for c in ev.stages})
    ]
    through = _throughput_bottleneck(problem, ev)
    objective = {"latency": _latency_bottleneck, "energy": _energy_bottleneck}.get(problem.objective)
    return Explanation(
        stages=stages,
        hops=hops,
        nodes=nodes,
        compute_s=sum(c.compute_s for c in ev.stages),
        transfer_s=sum(h.transfer_s for h in ev.hops),
        bottleneck=objective(problem, ev) if objective else through,
        throughput_bottleneck=through,
        binding_constraints=binding_constraints(problem, ev),
    )
