"""What the broadcast service accepts and answers: plans, rollouts, acks, desired state."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgeorch.schemas.plan import PlanStage
from edgeorch.schemas.profile import WeightFormat
from edgeorch.schemas.stage import ID_PATTERN, NextHop

# Deployment names become the first part of stage ids ("{deployment}.v{version}.s{index}"),
# so they may not contain the dot that separates those parts.
DEPLOYMENT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"

Phase = Literal["preparing", "committed", "completed", "aborted"]


class Plan(BaseModel):
    """An ordered list of stages that tiles the model's units from 0 with no gap or overlap.

    Every stage names a node a worker can register as (:data:`ID_PATTERN`) and
    the URL it is reached at.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256, description="store name or checkpoint directory")
    stages: list[PlanStage] = Field(min_length=1, max_length=256)
    format: WeightFormat = Field(
        default="fp32", description="weight format every stage loads (the lean engine's; fp32 is exact)"
    )

    @model_validator(mode="after")
    def _tiles(self) -> Plan:
        expected = 0
        for i, s in enumerate(self.stages):
            if s.start != expected or s.end <= s.start:
                raise ValueError(
                    f"stage {i} covers [{s.start}, {s.end}) but must start at {expected} and be non-empty"
                )
            if not re.match(ID_PATTERN, s.node):
                raise ValueError(f"stage {i}: node {s.node!r} is not a node id (pattern {ID_PATTERN})")
            if s.url is None:
                raise ValueError(
                    f"stage {i} has no url: a rollout must know where node {s.node!r} is reached"
                )
            expected = s.end
        return self


class RolloutRequest(BaseModel):
    """Roll ``deployment`` out to plan ``version``; the version defaults to the next free number."""

    model_config = ConfigDict(extra="forbid")

    deployment: str = Field(pattern=DEPLOYMENT_PATTERN)
    version: int | None = Field(default=None, ge=1, lt=2**31)
    plan: Plan
    supersede_drain: bool = Field(
        default=False,
        description="if the previous rollout is still draining its old version, release that version now "
        "instead of answering 409 (its sessions must be replayed elsewhere: the gateway's recovery does)",
    )


class AckRequest(BaseModel):
    """A worker's answer to PREPARE: its new stages are loaded and warm (or why not)."""

    model_config = ConfigDict(extra="forbid")

    rollout_id: str = Field(pattern=ID_PATTERN)
    node_id: str = Field(pattern=ID_PATTERN)
    ok: bool
    prepare_s: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    bytes_read: int = Field(default=0, ge=0)
    error: str | None = Field(default=None, max_length=4000)


class AckView(BaseModel):
    """An ack as the broadcast service recorded it."""

    node_id: str
    ok: bool
    prepare_s: float
    bytes_read: int
    error: str | None
    received_at: float


class RolloutView(BaseModel):
    """A rollout, its phase, and every affected worker's ack. Times are Unix seconds."""

    id: str
    deployment: str
    version: int
    from_version: int | None
    phase: Phase
    reason: str | None
    nodes: list[str] = Field(description="the workers that must ack PREPARE")
    acks: list[AckView]
    created_at: float
    prepare_deadline: float
    acked_at: float | None = Field(description="when the last ack arrived")
    committed_at: float | None
    finished_at: float | None
    prepare_s: float | None = Field(description="created → every worker acked")
    commit_s: float | None = Field(description="every worker acked → COMMIT durable and published")


class PlacedStage(PlanStage):
    """A plan stage with its stage id and next pointer, as the workers load it."""

    model_config = ConfigDict(extra="ignore")

    stage_id: str
    url: str
    model: str
    next: NextHop | None
    format: str = "fp32"


class VersionStatus(BaseModel):
    """One plan version of a deployment and where it stands."""

    version: int
    status: Literal["preparing", "active", "draining", "retired", "aborted"]
    created_at: float


class PlacementView(BaseModel):
    """A deployment's active version and where new sessions enter it."""

    name: str
    model: str
    active_version: int
    entry: NextHop = Field(description="the first stage of the active version: new sessions start here")
    stages: list[PlacedStage]
    versions: list[VersionStatus]
