"""What the orchestrator's dashboard API answers: the cluster at a glance, live series, emulation.

Every figure the dashboard page shows comes from one of these views (or from
the deployments and events the orchestrator already serves); the page only
draws and formats them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from edgeorch.schemas.stage import Emulation

NodeState = Literal["ready", "suspect", "lost"]


class ModelSpeed(BaseModel):
    """A node's decode speed on one model: measured now against its calibration."""

    model: str = Field(description="profile key: a model, or model@format")
    measured_flops_per_s: float | None = Field(description="median of the node's recent speed samples")
    calibrated_flops_per_s: float | None = Field(description="the calibration run's figure")
    ratio: float | None = Field(description="measured / calibrated; 0.25 means four times slower")
    samples: int


class NodeCard(BaseModel):
    """One node as the dashboard shows it."""

    node_id: str
    url: str
    state: NodeState
    why: str | None = Field(description="what made a node suspect or lost")
    silent_s: float | None = Field(description="seconds since its last heartbeat")
    trusted: bool
    watts: float
    cores: int
    memory_offered_bytes: int
    memory_planned_bytes: int = Field(
        description="weights plus KV cache of every active stage on the node, as the cost model counts them"
    )
    host_memory_free_bytes: int | None = Field(description="the host's available memory (last heartbeat)")
    cpu_percent: float | None
    queue_depth: int | None
    sessions: int | None
    speeds: list[ModelSpeed]
    stages: list[str] = Field(description="active stages on the node, as deployment vVERSION start:end")
    emulation: Emulation | None = Field(description="the worker's emulated capacity (None: it did not say)")


class LinkCell(BaseModel):
    """One directed link as measured by the workers' probes."""

    src: str
    dst: str
    bandwidth_bytes_per_s: float | None
    rtt_s: float | None
    samples: int


class ClusterView(BaseModel):
    """Nodes and links, for the dashboard."""

    ts: float
    nodes: list[NodeCard]
    links: list[LinkCell]
    models: list[str] = Field(description="models in the orchestrator's model store")


class SeriesPoint(BaseModel):
    """A deployment's gateway figures over the trailing window ending at ``t``."""

    t: float = Field(description="Unix seconds")
    requests: int = Field(description="requests finished in the window")
    failed: int
    tokens_per_s: float = Field(description="tokens generated in the window / its length")
    request_latency_s: float | None = Field(description="mean wall time of the requests finished in it")
    step_s: float | None = Field(description="mean decode step (time per generated token) in it")


class DeploymentSeries(BaseModel):
    """One deployment's points, oldest first."""

    deployment: str
    points: list[SeriesPoint]


class SeriesView(BaseModel):
    """Live series of every deployment the gateway has served."""

    sample_s: float = Field(description="a point is taken this often")
    window_s: float = Field(description="each point covers this trailing window")
    series: list[DeploymentSeries]
