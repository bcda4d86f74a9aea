"""Plan versions as workers see them: stage ids, next pointers, each node's desired state.

Pure functions over plain records; the broadcast service reads the records
from its tables and the worker's rollout agent applies the result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from edgeorch.rollout.state import PHASE_RANK
from edgeorch.schemas.rollout import PlacedStage, Plan
from edgeorch.schemas.stage import NextHop

_STAGE_ID = re.compile(r"^(?P<deployment>[A-Za-z0-9][A-Za-z0-9_-]*)\.v(?P<version>\d+)\.s(?P<index>\d+)$")


@dataclass(frozen=True)
class StageRef:
    """The parts of a versioned stage id."""

    deployment: str
    version: int
    index: int


def stage_id(deployment: str, version: int, index: int) -> str:
    """The id of stage ``index`` of plan ``version``: versions never share a stage id (or a KV cache)."""
    return f"{deployment}.v{version}.s{index}"


def parse_stage_id(sid: str) -> StageRef | None:
    """The deployment, version and index of a versioned stage id; None for any other id."""
    m = _STAGE_ID.match(sid)
    if m is None:
        return None
    return StageRef(m["deployment"], int(m["version"]), int(m["index"]))


def place(deployment: str, version: int, plan: Plan) -> list[PlacedStage]:
    """Every stage of a plan with its id and the pointer to the next stage (None for the last)."""
    ids = [stage_id(deployment, version, i) for i in range(len(plan.stages))]
    urls = [str(s.url).rstrip("/") for s in plan.stages]
    placed = []
    for i, s in enumerate(plan.stages):
        nxt = None
        if i + 1 < len(plan.stages):
            nxt = NextHop(url=urls[i + 1], stage_id=ids[i + 1])
        placed.append(
            PlacedStage(stage_id=ids[i], node=s.node, url=urls[i], model=plan.model,
                        start=s.start, end=s.end, next=nxt, format=plan.format,
                        activation_format=s.activation_format if nxt is not None else "fp32")
        )  # fmt: skip
    return placed


def node_urls(plan: Plan) -> dict[str, str]:
    """Each node of a plan and the URL it was given at (the first one, if a node hosts several stages)."""
    urls: dict[str, str] = {}
    for s in plan.stages:
        urls.setdefault(s.node, str(s.url).rstrip("/"))
    return urls


@dataclass
class DeploymentSnapshot:
    """What the broadcast service knows about one deployment at one moment.

    ``rollout_*`` describe the deployment's latest rollout (None when it has
    none); ``plans`` holds at least every version that is still kept.
    """

    name: str
    active_version: int | None
    plans: dict[int, Plan] = field(default_factory=dict)
    rollout_id: str | None = None
    rollout_version: int | None = None
    rollout_phase: str | None = None
    rollout_from: int | None = None


def kept_versions(snap: DeploymentSnapshot) -> list[int]:
    """Versions whose stages must stay loaded: the active one, one being prepared, one draining."""
    keep = set()
    if snap.active_version is not None:
        keep.add(snap.active_version)
    if snap.rollout_phase == "preparing" and snap.rollout_version is not None:
        keep.add(snap.rollout_version)
    if snap.rollout_phase == "committed" and snap.rollout_from is not None:
        keep.add(snap.rollout_from)  # sessions that started on it are still finishing there
    return sorted(keep)


def newest(snap: DeploymentSnapshot) -> tuple[int, int]:
    """(version, phase rank) of the deployment's latest state; it only ever grows."""
    if snap.rollout_version is not None and snap.rollout_phase is not None:
        return snap.rollout_version, PHASE_RANK[snap.rollout_phase]
    return snap.active_version or 0, PHASE_RANK["completed"]


def desired_for_node(node_id: str, snapshots: list[DeploymentSnapshot]) -> list[dict[str, Any]]:
    """For every deployment: the stages ``node_id`` must hold now, and a PREPARE it must ack.

    Every deployment is listed, also those without a stage on this node, so a
    worker knows to unload stages of versions (or deployments) it no longer
    serves. The result is plain JSON, ready to be signed.
    """
    out = []
    for snap in sorted(snapshots, key=lambda s: s.name):
        keep = kept_versions(snap)
        stages = []
        for v in keep:
            for p in place(snap.name, v, snap.plans[v]):
                if p.node == node_id:
                    stages.append({"stage_id": p.stage_id, "version": v, "model": p.model, "start": p.start,
                                   "end": p.end, "next": p.next.model_dump(mode="json") if p.next else None,
                                   "format": p.format, "activation_format": p.activation_format})  # fmt: skip
        prepare = None
        if snap.rollout_phase == "preparing" and snap.rollout_version is not None:
            nodes = {s.node for s in snap.plans[snap.rollout_version].stages}
            if node_id in nodes:
                prepare = {"rollout_id": snap.rollout_id, "version": snap.rollout_version}
        version, rank = newest(snap)
        out.append({"name": snap.name, "version": version, "rank": rank, "keep": keep,
                    "stages": stages, "prepare": prepare})  # fmt: skip
    return out
