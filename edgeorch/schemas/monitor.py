"""What workers tell the monitor, and what the monitor tells everyone else."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgeorch.schemas.stage import ID_PATTERN

_F = {"allow_inf_nan": False}


class NodeCapacity(BaseModel):
    """Static capacity of a node, from configuration."""

    model_config = ConfigDict(extra="forbid")

    cores: int = Field(ge=1)
    memory_bytes: int = Field(ge=0, description="memory the node offers for weights and KV cache")
    device: str = Field(default="cpu", max_length=64)
    trusted: bool = False
    watts: float = Field(default=10.0, ge=0, **_F)


class Registration(BaseModel):
    """A worker announcing itself."""

    model_config = ConfigDict(extra="forbid")

    node_id: str = Field(pattern=ID_PATTERN)
    url: str = Field(min_length=1, max_length=512)
    capacity: NodeCapacity


class SpeedSample(BaseModel):
    """A node's measured speed on one model: robust (median) figures over recent samples."""

    model_config = ConfigDict(extra="forbid")

    decode_flops_per_s: float | None = Field(default=None, gt=0, **_F)
    prefill_flops_per_s: float | None = Field(default=None, gt=0, **_F)
    samples: int = Field(default=0, ge=0)


class LinkSample(BaseModel):
    """A worker's current estimate of its link to one peer."""

    model_config = ConfigDict(extra="forbid")

    dst: str = Field(pattern=ID_PATTERN)
    rtt_s: float | None = Field(default=None, ge=0, **_F)
    bandwidth_bytes_per_s: float | None = Field(default=None, gt=0, **_F)
    resolvable_bytes_per_s: float | None = Field(
        default=None, gt=0, **_F, description="above this the probes cannot tell bandwidths apart"
    )
    samples: int = Field(default=0, ge=0)
    bandwidth_samples: int = Field(default=0, ge=0, description="transfers the bandwidth estimate has seen")


class UnitProfileTiming(BaseModel):
    """Measured seconds of one unit kind for one step shape."""

    model_config = ConfigDict(extra="forbid")

    unit: str
    prefill_s: float = Field(ge=0, **_F)
    decode_s: float = Field(ge=0, **_F)


class ProfileReport(BaseModel):
    """A calibration run of one model on one node."""

    model_config = ConfigDict(extra="forbid")

    model: str
    prefill_tokens: int
    decode_context: int
    units: list[UnitProfileTiming]
    decode_flops_per_s: float = Field(gt=0, **_F)
    prefill_flops_per_s: float = Field(gt=0, **_F)
    seconds_per_token_decode: float = Field(ge=0, **_F, description="whole model, one decode step")
    took_s: float = Field(ge=0, **_F)


class Heartbeat(BaseModel):
    """Live load and fresh measurements, sent every second."""

    model_config = ConfigDict(extra="forbid")

    cpu_percent: float = Field(ge=0, **_F)
    memory_free_bytes: int = Field(ge=0)
    rss_bytes: int = Field(default=0, ge=0, description="the worker's resident memory, from /proc")
    planned_bytes: int = Field(default=0, ge=0, description="weights it holds + the KV its stages plan for")
    queue_depth: int = Field(ge=0)
    sessions: int = Field(ge=0)
    stage_compute_s: dict[str, float] = Field(default_factory=dict, description="recent median per stage")
    speeds: dict[str, SpeedSample] = Field(default_factory=dict)
    links: list[LinkSample] = Field(default_factory=list)
    profiles: list[ProfileReport] = Field(
        default_factory=list, description="calibrations finished since last beat"
    )


class Peer(BaseModel):
    """Another live node a worker should probe."""

    node_id: str
    url: str


class HeartbeatReply(BaseModel):
    """What the monitor asks of a worker: whom to probe, which models to calibrate."""

    peers: list[Peer]
    profile_models: list[str]
    profiled_models: list[str]


class NodeView(BaseModel):
    """Everything the monitor knows of a node, in the splitter's vocabulary."""

    node_id: str
    url: str
    state: Literal["alive", "lost"]
    capacity: NodeCapacity
    memory_bytes: int
    trusted: bool
    watts: float
    flops_per_s: float | None = Field(description="decode speed on ?model= (or the first profiled model)")
    speeds: dict[str, SpeedSample]
    profiles: dict[str, ProfileReport]
    live: dict[str, Any]
    registered_at: float
    last_seen: float | None


class LinkView(BaseModel):
    """One directed link: src → dst."""

    src: str
    dst: str
    bandwidth_bytes_per_s: float | None
    rtt_s: float | None
    resolvable_bytes_per_s: float | None
    samples: int
    updated_at: float
    provisional: bool = Field(
        default=False,
        description="its figure may be stale: another link of src dropped and this one has not been "
        "re-measured since (its bandwidth is then reported as at most the dropped link's), or src's last "
        "heartbeat is late",
    )


class MonitorEvent(BaseModel):
    """A significant change, in the order it was detected."""

    id: int
    ts: float
    kind: Literal["node_joined", "node_lost", "node_returned", "speed_changed", "link_changed", "profiled"]
    node_id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
