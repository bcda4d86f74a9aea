"""What every lean family adapter shares: format, unit loading, stage boundaries.

A lean adapter subclasses the family's reference adapter (``LlamaAdapter``,
``GPT2Adapter``, ``BertAdapter``), so the unit chain, the checkpoint name
mapping, the config-derived sizes and the profile are the reference's own.
It replaces two things: ``load_unit`` builds a lean unit (plain tensors in a
weight format, projections fused) from the same checkpoint tensors, and
``run`` computes with it.

Between stages the activations are float32 whatever the format (the
residual stream is float32 in every format: only the matmuls run in bf16,
int8 or int4), so a split lossy chain computes exactly what the same format
computes unsplit, and the wire format and its checks do not change.
"""

from __future__ import annotations

import torch
from accelerate import init_empty_weights
from torch import nn

from edgeorch.engine.formats import skeleton
from edgeorch.engine.kv import LeanKVCache
from edgeorch.models.adapter import DEFAULT_PROFILE_CONTEXT
from edgeorch.models.checkpoint import CheckpointReader
from edgeorch.models.formats import act_dtype, check_format
from edgeorch.schemas.profile import ModelProfile


class LeanAdapterMixin:
    """Mixed in before a reference adapter: same units, lean modules, a weight format."""

    engine = "lean"

    def __init__(self, config, weight_format: str = "fp32"):
        check_format(weight_format)
        super().__init__(config)
        self.weight_format = weight_format
        self.dtype = act_dtype(weight_format)

    def read_unit_state(self, u: int, reader: CheckpointReader) -> dict[str, torch.Tensor]:
        """The reference module's state dict for unit ``u``, read tensor by tensor from the checkpoint."""
        if not 0 <= u < self.num_units:
            raise ValueError(f"unit {u} out of range [0, {self.num_units})")
        with init_empty_weights(include_buffers=False):
            module = self.build_unit(u)
        available = reader.keys()
        wanted = {k: self.checkpoint_name(u, k, available) for k in module.state_dict()}
        tensors = reader.read(sorted(set(wanted.values())))
        return {key: tensors[name] for key, name in wanted.items()}

    def load_unit(self, u: int, reader: CheckpointReader, dtype: torch.dtype | None = None) -> nn.Module:
        """Unit ``u`` as a lean module in this adapter's weight format (``dtype`` is ignored)."""
        return self.build_lean_unit(u, self.read_unit_state(u, reader)).eval()

    def skeleton_unit(self, u: int) -> nn.Module:
        """Unit ``u`` as a lean module whose parameters are shapes only (meta), ready to be filled."""
        with init_empty_weights(include_buffers=False):
            reference = self.build_unit(u)
        with skeleton():
            return self.build_lean_unit(u, reference.state_dict())

    def load_packed_unit(self, u: int, tensors: dict[str, torch.Tensor]) -> nn.Module:
        """Unit ``u`` filled with the tensors of its packed unit file, taken as they are (no copy)."""
        module = self.skeleton_unit(u)
        try:
            module.load_state_dict(tensors, strict=True, assign=True)
        except RuntimeError as exc:
            raise ValueError(
                f"packed unit {u} does not fit this model in {self.weight_format}: {exc}"
            ) from exc
        return module.eval()

    def build_lean_unit(self, u: int, state: dict[str, torch.Tensor]) -> nn.Module:
        """The lean module of unit ``u`` from the reference module's state dict."""
        raise NotImplementedError

    def profile(
        self,
        model: str,
        dtype_bytes: int = 4,
        wire_bytes: int = 4,
        context_tokens: int = DEFAULT_PROFILE_CONTEXT,
        weight_format: str | None = None,
    ) -> ModelProfile:
        """The reference profile with param and KV bytes of this adapter's format."""
        return super().profile(
            model, dtype_bytes, wire_bytes, context_tokens, weight_format=weight_format or self.weight_format
        )

    def layer_slots(self, units: list[tuple[int, nn.Module]]) -> tuple[int, int]:
        """(first layer unit, number of layer units) of a stage's units."""
        layers = [u for u, _ in units if 1 <= u <= self.num_layers]
        return (layers[0], len(layers)) if layers else (0, 0)

    def make_cache(self, num_layers: int, kv_heads: int, head_dim: int) -> LeanKVCache:
        """A preallocating cache for a stage with ``num_layers`` layers, bounded by the model's positions."""
        limit = getattr(self.config, "max_position_embeddings", None) or getattr(
            self.config, "n_positions", None
        )
        return LeanKVCache(max(num_layers, 1), kv_heads, head_dim, self.dtype, max_tokens=limit)


def check_cache(cache) -> LeanKVCache | None:
    """The lean cache a step runs with; a reference cache here is a wiring mistake, not a fallback."""
    if cache is None or isinstance(cache, LeanKVCache):
        return cache
    raise TypeError(f"a lean stage needs the cache from its own new_cache(), got {type(cache).__name__}")
