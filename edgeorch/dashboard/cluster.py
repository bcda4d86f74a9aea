"""The cluster as the dashboard shows it: one card per node, one cell per measured link (pure)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgeorch.schemas.dashboard import ClusterView, LinkCell, ModelSpeed, NodeCard, NodeState
from edgeorch.schemas.plan import PlanStage
from edgeorch.schemas.profile import ModelProfile
from edgeorch.schemas.stage import Emulation

# Workers beat every second and the monitor calls a node lost after 2 s of
# silence by default; a node that missed one beat is worth flagging before that.
SUSPECT_SILENCE_S = 1.5


@dataclass(frozen=True)
class Placement:
    """A deployment's active plan with the memory each of its units takes on a node."""

    deployment: str
    version: int
    stages: Sequence[PlanStage]
    unit_memory_bytes: Sequence[int]


def unit_memory_bytes(profile: ModelProfile, context_tokens: int, max_sessions: int) -> list[int]:
    """Bytes each unit occupies: weights plus KV cache for C·S tokens (the cost model's count, §3)."""
    tokens = context_tokens * max_sessions
    return [u.param_bytes + math.ceil(u.kv_bytes_per_token * tokens) for u in profile.units]


def node_state(monitor_state: str, silent_s: float | None, suspect: bool) -> tuple[NodeState, str | None]:
    """ready / suspect / lost, and why when not ready."""
    if monitor_state == "lost":
        return "lost", f"no heartbeat for {silent_s:.1f} s" if silent_s is not None else "lost"
    if suspect:
        return "suspect", "a request saw a stage on it fail"
    if silent_s is not None and silent_s > SUSPECT_SILENCE_S:
        return "suspect", f"no heartbeat for {silent_s:.1f} s"
    return "ready", None


def model_speeds(node: Mapping[str, Any]) -> list[ModelSpeed]:
    """Measured against calibrated decode speed, for every model the node has figures for."""
    speeds, profiles = node.get("speeds") or {}, node.get("profiles") or {}
    out = []
    for model in sorted(set(speeds) | set(profiles)):
        measured = (speeds.get(model) or {}).get("decode_flops_per_s")
        calibrated = (profiles.get(model) or {}).get("decode_flops_per_s")
        ratio = measured / calibrated if measured and calibrated else None
        samples = int((speeds.get(model) or {}).get("samples") or 0)
        out.append(ModelSpeed(model=model, measured_flops_per_s=measured, calibrated_flops_per_s=calibrated,
                              ratio=ratio, samples=samples))  # fmt: skip
    return out


def _planned(placements: Iterable[Placement]) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Bytes planned on each node and the stages it holds."""
    memory: dict[str, int] = {}
    stages: dict[str, list[str]] = {}
    for p in placements:
        for s in p.stages:
            memory[s.node] = memory.get(s.node, 0) + sum(p.unit_memory_bytes[s.start : s.end])
            stages.setdefault(s.node, []).append(f"{p.deployment} v{p.version} {s.start}:{s.end}")
    return memory, stages


def node_card(node: Mapping[str, Any], now: float, suspect: bool, planned_bytes: int, stages: list[str],
              emulation: Emulation | None) -> NodeCard:  # fmt: skip
    """One monitor node record (GET /v1/nodes) as a dashboard card."""
    last_seen = node.get("last_seen")
    silent_s = max(0.0, now - last_seen) if last_seen is not None else None
    state, why = node_state(node.get("state", "lost"), silent_s, suspect)
    live = node.get("live") or {}
    capacity = node.get("capacity") or {}
    return NodeCard(
        node_id=node["node_id"], url=node["url"], state=state, why=why, silent_s=silent_s,
        trusted=bool(node.get("trusted")), watts=float(node.get("watts") or 0.0),
        cores=int(capacity.get("cores") or 1), memory_offered_bytes=int(node.get("memory_bytes") or 0),
        memory_planned_bytes=planned_bytes, host_memory_free_bytes=live.get("memory_free_bytes"),
        cpu_percent=live.get("cpu_percent"), queue_depth=live.get("queue_depth"),
        sessions=live.get("sessions"), speeds=model_speeds(node), stages=stages, emulation=emulation,
    )  # fmt: skip


def cluster_view(
    nodes: Sequence[Mapping[str, Any]],
    links: Sequence[Mapping[str, Any]],
    *,
    now: float,
    suspects: Iterable[str] = (),
    placements: Iterable[Placement] = (),
    emulations: Mapping[str, Emulation | None] | None = None,
    models: Sequence[str] = (),
) -> ClusterView:
    """Every node the monitor knows (sorted by id) and every link it measured."""
    suspect_ids = set(suspects)
    memory, stages = _planned(placements)
    emulations = emulations or {}
    cards = [
        node_card(
            n,
            now,
            n["node_id"] in suspect_ids,
            memory.get(n["node_id"], 0),
            stages.get(n["node_id"], []),
            emulations.get(n["node_id"]),
        )  # fmt: skip
        for n in sorted(nodes, key=lambda n: n["node_id"])
    ]
    cells = [
        LinkCell(
            src=lk["src"],
            dst=lk["dst"],
            bandwidth_bytes_per_s=lk.get("bandwidth_bytes_per_s"),
            rtt_s=lk.get("rtt_s"),
            samples=int(lk.get("samples") or 0),
        )  # fmt: skip
        for lk in sorted(links, key=lambda lk: (lk["src"], lk["dst"]))
    ]
    return ClusterView(ts=now, nodes=cards, links=cells, models=list(models))
