"""The unit chain of a model as the planner sees it (DESIGN.md §2).

A model of L layers is L+2 units: 0 = embedding, 1..L = layers, L+1 = final
norm + head (or pooling). Each unit carries the four numbers the cost model
needs. Profiles are computed from a model's config (edgeorch.models.profile),
never written by hand.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


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
