"""Request and response of the splitter's ``POST /v1/plan`` (DESIGN.md §3, §4).

Everything a request can get wrong is rejected here, as a 422 with the field
that is wrong: NaN and infinities, negative figures, unknown node ids in
links or as the source, duplicate ids, a current plan that does not tile the
unit chain, trusted units out of range. The planner behind it can then trust
its input.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    TypeAdapter,
    field_validator,
    model_validator,
)

from edgeorch.schemas.profile import ModelProfile

Objective = Literal["latency", "throughput", "energy"]
Strategy = Literal["optimal", "even", "memory_proportional", "greedy_throughput", "two_way"]

# Bounds that keep every sum the planner forms inside int64 and float range,
# and every request inside a planning time the service can afford.
MAX_BYTES = 2**50
MAX_NODES = 1000
MAX_WORK = 20_000_000  # units² × nodes: the dynamic programme's inner size
MAX_FLOPS_PER_TOKEN = 1e18

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class NodeSpec(BaseModel):
    """One node that may host stages."""

    model_config = _STRICT

    id: str = Field(min_length=1, max_length=128)
    memory_bytes: int = Field(ge=0, le=MAX_BYTES, description="memory available for model units")
    flops_per_s: float = Field(ge=1.0, le=1e20, description="effective speed, calibrated on the model")
    trusted: bool = Field(default=False, description="may run units listed in trusted_units")
    watts: float = Field(ge=0, le=1e7, description="power draw while computing")


class LinkSpec(BaseModel):
    """A directed link; a pair without one is unreachable in that direction."""

    model_config = _STRICT

    src: str = Field(min_length=1, max_length=128)
    dst: str = Field(min_length=1, max_length=128)
    bandwidth_bytes_per_s: float = Field(ge=1.0, le=1e15)
    rtt_s: float = Field(ge=0, le=3600)

    @model_validator(mode="after")
    def _not_a_loop(self) -> LinkSpec:
        if self.src == self.dst:
            raise ValueError(f"link {self.src}->{self.dst} is a self-loop; a node needs no link to itself")
        return self


class Workload(BaseModel):
    """Tokens per request (P prompt + G generated), sessions S sharing KV cache of C tokens each."""

    model_config = _STRICT

    prompt_tokens: int = Field(default=64, ge=0, le=10_000_000)
    generated_tokens: int = Field(default=64, ge=0, le=10_000_000)
    max_sessions: int = Field(default=1, ge=1, le=1_000_000)
    context_tokens: int = Field(default=512, ge=0, le=10_000_000)

    @model_validator(mode="after")
    def _some_tokens(self) -> Workload:
        if self.prompt_tokens + self.generated_tokens < 1:
            raise ValueError("prompt_tokens + generated_tokens must be at least 1")
        return self


_HTTP_URL = TypeAdapter(HttpUrl)


def _http_url(url: str) -> str:
    """``url`` as given, once it parses as an http(s) URL (HttpUrl itself would append a slash)."""
    _HTTP_URL.validate_python(url)
    return url


StageUrl = Annotated[str, Field(max_length=2083), AfterValidator(_http_url)]


class PlanStage(BaseModel):
    """Units ``[start, end)`` on a node: the one stage type of every plan.

    The splitter plans without URLs; a plan handed to broadcast, and the
    orchestrator's record of it, also say where each node is reached
    (``url``). ``node_id`` is read as ``node``: broadcast's plans used that
    name before, and plans it stored then still do.
    """

    model_config = _STRICT

    node: str = Field(min_length=1, max_length=128, validation_alias=AliasChoices("node", "node_id"))
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    url: StageUrl | None = Field(
        default=None,
        exclude_if=lambda url: url is None,
        description="where the node is reached (a rollout's plan needs it; the splitter's answer has none)",
    )
    activation_format: Literal["fp32", "bf16", "int8"] = Field(
        default="fp32",
        exclude_if=lambda fmt: fmt == "fp32",
        description="how this stage's hidden states cross the hop to the next stage (the orchestrator "
        "chooses it per link from the measured bandwidth; fp32, the exact default, is left out of JSON)",
    )

    @model_validator(mode="after")
    def _non_empty(self) -> PlanStage:
        if self.end <= self.start:
            raise ValueError(f"stage [{self.start}, {self.end}) is empty")
        return self


class DefaultLink(BaseModel):
    """What every ordered pair of distinct nodes that ``links`` does not list is assumed to have."""

    model_config = _STRICT

    bandwidth_bytes_per_s: float = Field(ge=1.0, le=1e15)
    rtt_s: float = Field(ge=0, le=3600)


class PlanRequest(BaseModel):
    """Everything the planner needs; see DESIGN.md §4 for the shape."""

    model_config = _STRICT

    profile: ModelProfile
    nodes: list[NodeSpec] = Field(min_length=1, max_length=MAX_NODES)
    links: list[LinkSpec] = Field(default_factory=list)
    default_link: DefaultLink | None = Field(
        default=None,
        description="assumed for pairs `links` does not list (a large fleet sends measured links only); "
        "null: such pairs have no link",
    )
    source: str = Field(
        min_length=1, max_length=128, description="node where requests enter and results return"
    )
    objective: Objective = "latency"
    workload: Workload = Field(default_factory=Workload)
    trusted_units: list[int] = Field(default_factory=list, description="units that must run on trusted nodes")
    current_plan: list[PlanStage] | None = Field(
        default=None, description="the plan serving now; its nodes may include ones that are gone"
    )
    strategy: Strategy = Field(default="optimal", description="optimal planner or a baseline rule")
    migration_weight: float = Field(
        default=0.0,
        ge=0,
        le=1e6,
        description="added to the objective per byte of weights moved (s/byte for latency, J/byte for energy)",
    )
    max_migration_bytes: int | None = Field(
        default=None, ge=0, le=MAX_BYTES, description="cap on weights moved"
    )
    time_limit_s: float = Field(
        default=1.0, gt=0, le=60, description="search time before answering optimal: false"
    )

    @field_validator("trusted_units")
    @classmethod
    def _unique_units(cls, units: list[int]) -> list[int]:
        if len(set(units)) != len(units):
            raise ValueError("trusted_units lists a unit twice")
        return sorted(units)

    @model_validator(mode="after")
    def _consistent(self) -> PlanRequest:
        ids = [n.id for n in self.nodes]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"duplicate node ids: {dup}")
        known = set(ids)
        if self.source not in known:
            raise ValueError(f"source {self.source!r} is not one of the nodes")
        self._check_links(known)
        n_units = self.profile.num_units
        bad = [u for u in self.trusted_units if not 0 <= u < n_units]
        if bad:
            raise ValueError(f"trusted_units {bad} out of range: the profile has units 0..{n_units - 1}")
        if self.current_plan is not None:
            _check_tiling(self.current_plan, n_units)
        self._check_sizes()
        if self.objective == "throughput" and self.migration_weight > 0:
            raise ValueError("migration_weight has no unit for objective throughput; use max_migration_bytes")
        return self

    def _check_links(self, known: set[str]) -> None:
        seen: set[tuple[str, str]] = set()
        for link in self.links:
            unknown = [x for x in (link.src, link.dst) if x not in known]
            if unknown:
                raise ValueError(f"link {link.src}->{link.dst} names unknown node ids {unknown}")
            if (link.src, link.dst) in seen:
                raise ValueError(f"link {link.src}->{link.dst} is given twice")
            seen.add((link.src, link.dst))

    def _check_sizes(self) -> None:
        n_units = self.profile.num_units
        if n_units * n_units * len(self.nodes) > MAX_WORK:
            raise ValueError(
                f"{n_units} units on {len(self.nodes)} nodes is beyond what one request may plan"
            )
        w = self.workload
        kv_tokens = w.context_tokens * w.max_sessions
        for i, unit in enumerate(self.profile.units):
            # Keeps every predicted time finite (and so every response valid JSON).
            if unit.flops_per_token > MAX_FLOPS_PER_TOKEN or unit.out_bytes_per_token > MAX_BYTES:
                raise ValueError(f"unit {i} has implausible flops_per_token or out_bytes_per_token")
            total = unit.param_bytes + math.ceil(unit.kv_bytes_per_token * kv_tokens)
            if total > MAX_BYTES:
                raise ValueError(f"unit {i} needs {total} bytes, more than any node could hold ({MAX_BYTES})")


def _check_tiling(stages: list[PlanStage], n_units: int) -> None:
    pos = 0
    for s in stages:
        if s.start != pos:
            raise ValueError(
                f"current_plan must tile [0, {n_units}): stage [{s.start}, {s.end}) should start at {pos}"
            )
        pos = s.end
    if pos != n_units:
        raise ValueError(f"current_plan ends at unit {pos}, the profile has {n_units} units")


class Predicted(BaseModel):
    """What the cost model predicts for a plan."""

    latency_s: float
    throughput_tokens_per_s: float | None = Field(
        description="None when nothing bounds it (no compute, no hops)"
    )
    energy_j: float
    bottleneck_s_per_token: float


class SolverInfo(BaseModel):
    """How the plan was found and how sure the planner is of it."""

    name: str
    strategy: Strategy
    optimal: bool = Field(description="proven optimal for the objective under every constraint")
    time_s: float
    objective_value: float = Field(description="the minimised score: objective + migration_weight·bytes")
    objective_unit: str
    bound: float | None = Field(description="no plan scores below this (same unit); None for baselines")
    gap: float | None = Field(description="(objective_value - bound) / objective_value")
    branches: int = 0


class StageReport(BaseModel):
    """A stage with its predicted compute time and memory use."""

    node: str
    start: int
    end: int
    compute_s: float
    load_s_per_token: float
    memory_bytes: int
    energy_j: float


class HopReport(BaseModel):
    """A hop with its predicted transfer time. Entry hops carry token ids, exit hops results."""

    src: str
    dst: str
    kind: Literal["entry", "internal", "exit"]
    after_unit: int | None
    bytes_per_token: float
    transfer_s: float
    load_s_per_token: float


class NodeReport(BaseModel):
    """A node's totals over all its stages."""

    node: str
    memory_bytes: int
    memory_capacity_bytes: int
    load_s_per_token: float
    energy_j: float


class Bottleneck(BaseModel):
    """The resource that limits the objective, in words and figures."""

    kind: Literal["node_compute", "link_transfer", "none"]
    subject: str
    value: float
    unit: str
    message: str


class Explanation(BaseModel):
    """Why the plan performs as predicted."""

    stages: list[StageReport]
    hops: list[HopReport]
    nodes: list[NodeReport]
    compute_s: float
    transfer_s: float
    bottleneck: Bottleneck
    throughput_bottleneck: Bottleneck
    binding_constraints: list[str]


class CauseReport(BaseModel):
    """One reason a plan is impossible or invalid."""

    kind: str
    message: str
    nodes: list[str] = []
    units: list[int] = []
    links: list[tuple[str, str]] = []
    short_by_bytes: dict[str, int] = {}


class Revision(BaseModel):
    """The change from the current plan: keep, remap (same ranges, other nodes) or resplit."""

    kind: Literal["keep", "remap", "resplit"]
    migration_bytes: int
    moved_units: list[int]
    current_feasible: bool
    current_predicted: Predicted | None
    current_violations: list[CauseReport]


class PlanResponse(BaseModel):
    """``POST /v1/plan`` answer."""

    stages: list[PlanStage]
    predicted: Predicted
    migration_bytes: int
    solver: SolverInfo
    revision: Revision | None
    explanation: Explanation


class InfeasibleDetail(BaseModel):
    """Body of the 422 for a request no plan can satisfy."""

    error: Literal["infeasible"] = "infeasible"
    message: str
    causes: list[CauseReport]
