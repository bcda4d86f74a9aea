"""The unit chain of a model as the planner sees it (DESIGN.md §2).

A model of L layers is L+2 units: 0 = embedding, 1..L = layers, L+1 = final
norm + head (or pooling). Each unit carries the four numbers the cost model
needs. Profiles are computed from a model's config (edgeorch.models.profile),
never written by hand.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The weight formats of the lean engine (edgeorch.engine.formats), named here
# so that every schema that carries one (stage specs, plans, policies) checks
# the same list without importing torch.
WeightFormat = Literal["fp32", "bf16", "int8", "int4"]
EXACT_FORMAT = "fp32"
LOSSY_FORMATS = tuple(f for f in get_args(WeightFormat) if f != EXACT_FORMAT)


def profile_key(model: str, weight_format: str = EXACT_FORMAT) -> str:
    """The name nodes calibrate ``model`` in ``weight_format`` under: the model for fp32, else ``model@format``.

    A node runs int8 weights about three times faster than fp32 ones, so its
    measured speed is a property of the pair, and the monitor keeps one
    calibration (and one speed window) per key without knowing what the key
    means. fp32 keeps the plain model name: the lean fp32 engine and the
    reference engine run at the same speed.
    """
    return model if weight_format == EXACT_FORMAT else f"{model}@{weight_format}"


def split_profile_key(key: str) -> tuple[str, str]:
    """(model, weight format) of a :func:`profile_key`.

    Only a known lossy format after the last ``@`` is a format: a checkpoint
    directory may itself contain an ``@`` (``/data/a@b`` is an fp32 key).
    """
    model, sep, fmt = key.rpartition("@")
    return (model, fmt) if sep and model and fmt in LOSSY_FORMATS else (key, EXACT_FORMAT)


class UnitProfile(BaseModel):
    """Cost figures of one unit, per token of input."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    param_bytes: int = Field(ge=0, description="bytes of weights this unit holds, at the stored dtype")
    flops_per_token: float = Field(
        ge=0, allow_inf_nan=False, description="floating-point operations per token"
    )
    out_bytes_per_token: float = Field(
        ge=0,
        allow_inf_nan=False,
        description="bytes this unit hands to the next one per token, at the wire dtype",
    )
    kv_bytes_per_token: float = Field(
        ge=0, allow_inf_nan=False, description="KV-cache bytes per token of context (0 for encoders)"
    )


class ModelProfile(BaseModel):
    """Every unit of a model, in chain order, plus the entry and exit payloads."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=128)
    units: list[UnitProfile] = Field(min_length=1, max_length=100_000)
    input_bytes_per_token: float = Field(default=4, ge=0, allow_inf_nan=False)
    result_bytes_per_token: float = Field(default=4, ge=0, allow_inf_nan=False)

    @field_validator("units")
    @classmethod
    def _at_least_embedding_and_head(cls, units: list[UnitProfile]) -> list[UnitProfile]:
        if len(units) < 2:
            raise ValueError("a model profile needs at least an embedding unit and a head unit")
        return units

    @property
    def num_units(self) -> int:
        """Number of units in the chain (L + 2)."""
        return len(self.units)
