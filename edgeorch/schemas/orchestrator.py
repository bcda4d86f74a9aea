"""What the orchestrator accepts and answers: deployments, QoS policies, plan history, decisions."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgeorch.schemas.plan import Objective, PlanStage, Strategy, Workload
from edgeorch.schemas.profile import WeightFormat
from edgeorch.schemas.rollout import DEPLOYMENT_PATTERN

DeploymentState = Literal["pending", "ready", "degraded", "failed"]
# "edges": the embedding and the head (the units that see plain tokens) on
# trusted nodes; "all": every unit on trusted nodes.
Privacy = Literal["none", "edges", "all"]
DecisionKind = Literal["deploy", "keep", "remap", "resplit", "reformat", "recover"]

_F = {"allow_inf_nan": False}


class QosPolicy(BaseModel):
    """How a deployment is to be served and when its plan may change."""

    model_config = ConfigDict(extra="forbid")

    objective: Objective = "latency"
    latency_slo_s: float | None = Field(
        default=None, gt=0, le=3600, **_F, description="target time per generated token (a decode step)"
    )
    privacy: Privacy = "none"
    trusted_units: list[int] = Field(default_factory=list, description="extra units that need trusted nodes")
    workload: Workload = Field(
        default_factory=lambda: Workload(prompt_tokens=64, generated_tokens=64, max_sessions=4),
        description="the request shape plans are optimised for",
    )
    min_gain: float = Field(
        default=0.3, ge=0, le=1, **_F, description="smallest predicted relative gain that justifies a change"
    )
    cooldown_s: float = Field(
        default=10.0, ge=0, le=86400, **_F, description="least time between two voluntary plan changes"
    )
    migration_weight: float = Field(
        default=0.0, ge=0, **_F, description="seconds (latency) or joules (energy) charged per byte moved"
    )
    source: str | None = Field(default=None, description="node where requests enter; default: chosen")
    strategy: Strategy = Field(default="optimal", description="the splitter's planner or a baseline rule")
    adaptive: bool = Field(default=True, description="re-plan on monitor events, SLO misses and the timer")
    replan_every_s: float | None = Field(
        default=None, gt=0, le=86400, **_F, description="re-plan on this period only (with adaptive: false)"
    )
    recover: bool = Field(default=True, description="carry sessions over a stage that dies")
    nodes: list[str] | None = Field(default=None, description="only these nodes may host stages")
    weight_format: WeightFormat = Field(
        default="fp32",
        description="weights of every stage: fp32 (exact: the unsplit model's output), or the lossy bf16, "
        "int8, int4 of the lean engine; memory and calibrated speed follow it",
    )
    activation_formats: list[Literal["fp32", "bf16", "int8"]] = Field(
        default_factory=lambda: ["fp32", "bf16", "int8"],
        min_length=1,
        description="formats a hop between two nodes may carry, chosen per link from its measured "
        'bandwidth (edgeorch.planning.formats); ["fp32"] turns compression off',
    )
    quality_budget: float = Field(
        default=0.01, ge=0, le=1, **_F,
        description="most predicted share of greedy tokens that may differ from fp32 hops, summed over "
        "the compressed hops of the chain (0: fp32 only)",
    )  # fmt: skip
    compress_min_gain: float = Field(
        default=0.05, ge=0, le=1, **_F,
        description="smallest predicted relative gain for a change of hop formats alone toward compression "
        "(a reformat moves no weights and keeps every KV cache on its node, so it needs less than min_gain)",
    )  # fmt: skip


class DeploymentRequest(BaseModel):
    """Create a deployment: a model served under a policy."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=DEPLOYMENT_PATTERN)
    model: str = Field(min_length=1, max_length=256, description="model store name")
    policy: QosPolicy = Field(default_factory=QosPolicy)


class PredictedView(BaseModel):
    """What the cost model predicts for a plan under the latest measurements."""

    latency_s: float
    throughput_tokens_per_s: float | None
    energy_j: float
    step_s: float = Field(description="one decode step through the chain (one token)")
    compute_step_s: float | None = Field(default=None, description="of step_s, the stages' compute")
    batch_sessions: int = Field(default=1, description="sessions generating at once (workload.max_sessions)")
    batch_tokens_per_s: float | None = Field(
        default=None, description="all batch_sessions together, each stage batching their steps"
    )
    batch_step_s: float | None = Field(default=None, description="inter-token latency at batch_sessions")


class MeasuredView(BaseModel):
    """What the gateway measured on real requests since the plan became active."""

    step_s: float | None = Field(description="median time per generated token over recent requests")
    steps: int
    requests: int
    failed_requests: int
    slo_attainment: float | None = Field(description="share of recent steps within the latency SLO")


class PlanRecord(BaseModel):
    """One entry of a deployment's plan history."""

    version: int
    kind: DecisionKind
    reason: str
    stages: list[PlanStage] = Field(description="each with the URL its node was reached at")
    predicted: PredictedView | None
    migration_bytes: int
    created_at: float
    committed_at: float | None
    outcome: Literal["committed", "aborted", "pending"]


class DeploymentView(BaseModel):
    """A deployment as the orchestrator keeps it."""

    name: str
    model: str
    kind: Literal["decoder", "encoder"]
    policy: QosPolicy
    state: DeploymentState
    reason: str | None
    version: int | None
    stages: list[PlanStage]
    predicted: PredictedView | None
    measured: MeasuredView
    history: list[PlanRecord]
    created_at: float


class OrchestratorEvent(BaseModel):
    """One entry of the decision log."""

    id: int
    ts: float
    kind: str = Field(description="e.g. node_lost (seen), keep, remap, resplit, recover, rollout_aborted")
    deployment: str | None
    message: str
    data: dict[str, Any] = Field(default_factory=dict)
