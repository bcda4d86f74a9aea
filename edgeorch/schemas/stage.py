"""What workers accept: stage specs, per-request metadata, emulation settings."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, model_validator

from edgeorch.schemas.profile import WeightFormat
from edgeorch.security.credentials import CREDENTIAL_PATTERN

# Stage and session ids travel in URLs and metric labels: keep them plain.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"


class NextHop(BaseModel):
    """Where a stage sends its output: the next worker and the stage id there."""

    model_config = ConfigDict(extra="forbid")

    url: HttpUrl
    stage_id: str = Field(pattern=ID_PATTERN)
    # Never shown: a stage's info lists its next hop, and anyone may read that.
    credential: str | None = Field(
        default=None, pattern=CREDENTIAL_PATTERN, exclude=True, repr=False,
        description="the next stage's data-plane credential, sent on every step (write-only)",
    )  # fmt: skip


class StageSpec(BaseModel):
    """Load units ``[start, end)`` of ``model`` on this worker as stage ``stage_id``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256, description="store name or checkpoint directory")
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    next: NextHop | None = Field(default=None, description="the next stage; null for the last stage")
    dtype: Literal["float32"] = "float32"
    engine: Literal["hf", "lean"] = Field(
        default="lean",
        description="lean: edgeorch's fast engine; hf: the Hugging Face modules (the reference)",
    )
    format: WeightFormat = Field(
        default="fp32", description="weights: fp32 (exact), bf16, int8 or int4 with bf16 matmuls (lean only)"
    )
    kv_sessions: int = Field(default=1, ge=0, le=4096, description="sessions the plan gives this stage")
    kv_context: int = Field(default=256, ge=0, le=1 << 20, description="context tokens per planned session")
    credential: str | None = Field(
        default=None, pattern=CREDENTIAL_PATTERN, exclude=True, repr=False,
        description="forward and session calls must carry it (x-edgeorch-stage-credential); null: an open "
        "stage. Write-only: never shown",
    )  # fmt: skip
    activation_format: Literal["fp32", "bf16", "int8"] = Field(
        default="fp32",
        description="how this stage's hidden states cross the hop to the next stage: fp32 (exact), bf16, "
        "or int8 with one scale per token (edgeorch.transport.compression)",
    )

    @model_validator(mode="after")
    def _engine_has_format(self) -> StageSpec:
        if self.engine == "hf" and self.format != "fp32":
            raise ValueError(f"engine 'hf' (the reference) runs fp32 only, not {self.format!r}")
        return self


class StageInfo(BaseModel):
    """A loaded stage as the worker reports it."""

    stage_id: str
    model: str
    start: int
    end: int
    next: NextHop | None
    num_units: int
    param_bytes: int
    bytes_read: int = Field(description="checkpoint bytes this load read (0 when every unit was shared)")
    load_s: float
    sessions: int
    units_shared: int = Field(default=0, description="units reused from other stages on this worker")
    engine: str = Field(default="hf", description="the engine that runs the stage")
    format: str = Field(default="fp32", description="the weight format it holds")
    kv_bytes: int = Field(default=0, description="KV bytes planned for it: kv_sessions x kv_context tokens")
    activation_format: str = Field(
        default="fp32", description="how its hidden states cross the hop to the next stage"
    )


class Sampling(BaseModel):
    """How the last stage of a decoder picks the next token."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(default=0.0, ge=0.0, le=100.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, lt=2**63)


class LogprobRequest(BaseModel):
    """Ask the last stage for the sampled token's log-probability and the ``top`` likeliest alternatives."""

    model_config = ConfigDict(extra="forbid")

    top: int = Field(default=0, ge=0, le=20, description="alternatives per position (OpenAI's top_logprobs)")


class ForwardMeta(BaseModel):
    """Metadata of a forward frame; the tensors are in the frame body."""

    model_config = ConfigDict(extra="forbid")

    session: str = Field(pattern=ID_PATTERN)
    position: int = Field(default=0, ge=0, description="sequence position of the first token in this step")
    mode: Literal["generate", "logits", "encode"] = "generate"
    logits: Literal["last", "all"] = "last"
    sampling: Sampling = Field(default_factory=Sampling)
    release: bool = Field(default=False, description="free this session's KV cache after this step")
    logprobs: LogprobRequest | None = Field(
        default=None, description="generate mode: the last stage also returns log-probabilities"
    )


class Emulation(BaseModel):
    """Emulated node capacity: compute k× slower, outgoing activations paced and delayed."""

    model_config = ConfigDict(extra="forbid")

    slowdown: float = Field(default=1.0, ge=1.0, le=1000.0, allow_inf_nan=False)
    bandwidth_mbps: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    rtt_ms: float = Field(default=0.0, ge=0.0, le=60_000.0, allow_inf_nan=False)
    perturb: float = Field(
        default=0.0, ge=0.0, le=10.0, allow_inf_nan=False,
        description="tampering, for tests and benchmarks: noise of this size relative to the output's RMS "
        "is added to every output of every stage here (hidden states, or the logits a last stage samples "
        "from); 0: honest",
    )  # fmt: skip


class RowsMeta(BaseModel):
    """Metadata of a multi-session frame: one decode token of each of several sessions (batched hops)."""

    model_config = ConfigDict(extra="forbid")

    rows_version: Literal[1]
    rows: list[ForwardMeta] = Field(min_length=1, max_length=64)

    @model_validator(mode="after")
    def _decode_rows(self) -> RowsMeta:
        sessions = [row.session for row in self.rows]
        if len(set(sessions)) != len(sessions):
            raise ValueError("a session appears in two rows of one frame")
        for row in self.rows:
            if row.mode != "generate" or row.logits != "last" or row.logprobs is not None:
                raise ValueError(
                    f"row {row.session!r}: a multi-session frame carries generate steps without logprobs"
                )
        return self
