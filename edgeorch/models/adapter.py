"""One interface over model families: the unit chain, its profile, stage loading.

A family adapter knows three things about its architecture: how to build the
module of one unit from the config, which checkpoint tensor each of that
module's weights comes from, and how to run a contiguous run of units. The
rest — loading only a stage's tensors, computing the profile, running a stage
— is written once here.

Unit numbering (DESIGN.md §2): 0 = embedding, 1..L = layers, L+1 = head.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import PretrainedConfig

from edgeorch.models.checkpoint import CheckpointReader
from edgeorch.models.formats import act_dtype, int4_q8_0_tables, int4_scale_bytes, unit_weight_bytes
from edgeorch.models.kv import StageKVCache
from edgeorch.schemas.profile import ModelProfile, UnitProfile

# Attention cost per token grows with context; the profile quotes it at this
# many tokens of context unless the caller asks for another figure.
DEFAULT_PROFILE_CONTEXT = 512


class UnsupportedModelError(ValueError):
    """The config names an architecture no adapter handles."""


@dataclass
class StageInput:
    """What a stage receives.

    ``x`` is int64 token ids ``[B, T]`` for a stage that starts at unit 0,
    otherwise the hidden states ``[B, T, H]`` of the previous unit.
    """

    x: torch.Tensor
    position: int = 0
    attention_mask: torch.Tensor | None = None
    logits: str = "last"


class FamilyAdapter(ABC):
    """Architecture-specific knowledge for one model family."""

    family: ClassVar[str]
    is_decoder: ClassVar[bool]
    # The reference engine runs the Hugging Face modules in fp32; the lean
    # engine (edgeorch.engine) subclasses each adapter and overrides these.
    engine: ClassVar[str] = "hf"
    weight_format: str = "fp32"

    def __init__(self, config: PretrainedConfig):
        self.config = config
        # HF modules pick their attention kernel from the config; without this
        # a config read from disk falls back to eager attention, which neither
        # matches the reference model nor applies a causal mask by itself.
        config._attn_implementation = "sdpa"

    @property
    @abstractmethod
    def num_layers(self) -> int:
        """L, the number of transformer layers."""

    @property
    def num_units(self) -> int:
        """L + 2: embedding, the layers, the head."""
        return self.num_layers + 2

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width of the hidden states passed between units."""

    def unit_name(self, u: int) -> str:
        """A human-readable name for unit ``u``."""
        if u == 0:
            return "embed"
        if u == self.num_units - 1:
            return "head" if self.is_decoder else "pool"
        return f"layer{u - 1}"

    @abstractmethod
    def build_unit(self, u: int) -> nn.Module:
        """The module of unit ``u``, with freshly initialised (or meta) weights."""

    @abstractmethod
    def checkpoint_name(self, u: int, key: str, available: set[str]) -> str:
        """The checkpoint tensor holding ``key`` of unit ``u``'s state dict."""

    @abstractmethod
    def run(self, units: list[tuple[int, nn.Module]], inp: StageInput, cache) -> torch.Tensor:
        """Run a contiguous run of units on ``inp``; ``cache`` is a StageKVCache or None."""

    def unit_flops_per_token(self, u: int, module: nn.Module, context_tokens: int) -> float:
        """Floating-point operations per token: 2 per weight of each matmul, plus attention."""
        flops = 0.0
        for sub in module.modules():
            weight = getattr(sub, "weight", None)
            if weight is not None and weight.ndim == 2 and not isinstance(sub, nn.Embedding):
                flops += 2.0 * weight.numel()
        if 1 <= u <= self.num_layers:
            # QK^T and attention-weighted sum of V: 2 * 2 * hidden per context token.
            flops += 4.0 * self.hidden_size * context_tokens
        return flops

    def kv_bytes_per_token(self, u: int, dtype_bytes: int) -> float:
        """KV-cache bytes per context token held by unit ``u`` (0 for encoders)."""
        return 0.0

    def new_cache(self, start: int, end: int) -> StageKVCache:
        """An empty KV cache for one session of a stage of units ``[start, end)``."""
        return StageKVCache()

    def unit_keys(self, u: int, available: set[str]) -> list[str]:
        """Checkpoint tensors unit ``u`` needs, computed from its module."""
        with init_empty_weights(include_buffers=False):
            module = self.build_unit(u)
        return sorted({self.checkpoint_name(u, k, available) for k in module.state_dict()})

    def load_unit(self, u: int, reader: CheckpointReader, dtype: torch.dtype) -> nn.Module:
        """Build unit ``u`` and fill it from the checkpoint, reading only its tensors."""
        if not 0 <= u < self.num_units:
            raise ValueError(f"unit {u} out of range [0, {self.num_units})")
        with init_empty_weights(include_buffers=False):
            module = self.build_unit(u)
        available = reader.keys()
        wanted = {k: self.checkpoint_name(u, k, available) for k in module.state_dict()}
        tensors = reader.read(sorted(set(wanted.values())))
        state = {}
        for key, name in wanted.items():
            t = tensors[name]
            state[key] = t.to(dtype) if t.is_floating_point() else t
        module.load_state_dict(state, strict=True, assign=True)
        return module.eval()

    def profile(
        self,
        model: str,
        dtype_bytes: int = 4,
        wire_bytes: int = 4,
        context_tokens: int = DEFAULT_PROFILE_CONTEXT,
        weight_format: str | None = None,
    ) -> ModelProfile:
        """The unit profile of DESIGN.md §2, computed from the config alone.

        With ``weight_format`` (fp32, bf16, int8) the param and KV bytes are
        those of the lean engine in that format, not ``dtype_bytes`` per weight.
        """
        if weight_format is not None:
            dtype_bytes = act_dtype(weight_format).itemsize
        units: list[UnitProfile] = []
        layer_cache: tuple[int, float] | None = None
        for u in range(self.num_units):
            is_layer = 1 <= u <= self.num_layers
            if is_layer and layer_cache is not None:
                param_bytes, flops = layer_cache  # every layer of a family has the same shape
            else:
                with init_empty_weights():
                    module = self.build_unit(u)
                if weight_format is None:
                    param_bytes = sum(p.numel() for p in module.parameters()) * dtype_bytes
                else:
                    param_bytes = unit_weight_bytes(
                        module, weight_format, int4_scale_bytes(self.config), int4_q8_0_tables(self.config)
                    )
                flops = self.unit_flops_per_token(u, module, context_tokens)
                if is_layer:
                    layer_cache = (param_bytes, flops)
            last = u == self.num_units - 1
            units.append(
                UnitProfile(
                    name=self.unit_name(u),
                    param_bytes=param_bytes,
                    flops_per_token=flops,
                    out_bytes_per_token=4.0 if last else float(self.hidden_size * wire_bytes),
                    kv_bytes_per_token=self.kv_bytes_per_token(u, dtype_bytes),
                )
            )
        return ModelProfile(model=model, units=units, input_bytes_per_token=4, result_bytes_per_token=4)


def causal_mask(q_len: int, past_len: int) -> torch.Tensor | None:
    """Boolean attention mask for ``q_len`` new tokens after ``past_len`` cached ones.

    None where SDPA's own ``is_causal`` path is right (a fresh prefill) or no
    mask is needed (one new token): that is what the unsplit HF model does too,
    so both take the same kernel and produce the same bits.
    """
    if q_len == 1 or past_len == 0:
        return None
    total = past_len + q_len
    rows = torch.arange(past_len, total).unsqueeze(1)
    cols = torch.arange(total).unsqueeze(0)
    return (cols <= rows).view(1, 1, q_len, total)
