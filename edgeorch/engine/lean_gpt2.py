"""Lean GPT-2 units: learned positions, pre-LayerNorm blocks, tied LM head.

GPT-2 already fuses q/k/v into ``c_attn``; its Conv1D weights are stored
[in, out], so they are transposed once at load time into the [out, in] the
packed matmuls take. fp32 keeps the reference's own activation function
(``gelu_new`` is seven elementwise ops there); the lossy formats use the
single-kernel tanh GELU, which is the same function up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from edgeorch.engine.base import LeanAdapterMixin, check_cache
from edgeorch.engine.formats import PackedEmbedding, PackedLinear, packed_vector
from edgeorch.engine.kv import LeanKVCache
from edgeorch.models.adapter import StageInput, causal_mask
from edgeorch.models.formats import table_format
from edgeorch.models.gpt2 import GPT2Adapter

_TANH_GELUS = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}


def activation(name: str, fmt: str):
    """The MLP activation: the reference's own in fp32, a fused kernel where rounding may differ anyway."""
    if fmt != "fp32" and name in _TANH_GELUS:
        return partial(F.gelu, approximate="tanh")
    if fmt != "fp32" and name == "gelu":
        return F.gelu
    return ACT2FN[name]


@dataclass
class _Step:
    mask: torch.Tensor | None
    cache: LeanKVCache | None
    first_slot: int


class LeanGPT2Embed(nn.Module):
    """Unit 0: token plus learned position embedding."""

    def __init__(self, state: dict[str, torch.Tensor], fmt: str):
        super().__init__()
        self.wte = PackedEmbedding(state["wte.weight"], fmt)
        self.wpe = PackedEmbedding(state["wpe.weight"], fmt)

    def forward(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        positions = torch.arange(position, position + ids.shape[1]).unsqueeze(0)
        return self.wte(ids) + self.wpe(positions)


class LeanGPT2Block(nn.Module):
    """One block: LayerNorm, fused-qkv attention, residual; LayerNorm, MLP, residual."""

    def __init__(self, state: dict[str, torch.Tensor], config, layer_idx: int, fmt: str):
        super().__init__()
        self.hidden = config.n_embd
        self.heads = config.n_head
        self.head_dim = self.hidden // self.heads
        self.eps = config.layer_norm_epsilon
        self.scaling = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scaling /= float(layer_idx + 1)
        self.ln1_w, self.ln1_b = (
            packed_vector(state["ln_1.weight"], fmt),
            packed_vector(state["ln_1.bias"], fmt),
        )
        self.ln2_w, self.ln2_b = (
            packed_vector(state["ln_2.weight"], fmt),
            packed_vector(state["ln_2.bias"], fmt),
        )
        self.qkv = PackedLinear(state["attn.c_attn.weight"].t(), state["attn.c_attn.bias"], fmt)
        self.proj = PackedLinear(state["attn.c_proj.weight"].t(), state["attn.c_proj.bias"], fmt)
        self.fc = PackedLinear(state["mlp.c_fc.weight"].t(), state["mlp.c_fc.bias"], fmt)
        self.fc_proj = PackedLinear(state["mlp.c_proj.weight"].t(), state["mlp.c_proj.bias"], fmt)
        self.act = activation(config.activation_function, fmt)

    def forward(self, h: torch.Tensor, step: _Step, slot: int) -> torch.Tensor:
        b, t, _ = h.shape
        x = F.layer_norm(h, (self.hidden,), self.ln1_w, self.ln1_b, self.eps)
        qkv = self.qkv(x).view(b, t, 3 * self.heads, self.head_dim)
        q = qkv[:, :, : self.heads].transpose(1, 2)
        k, v = qkv[:, :, self.heads : 2 * self.heads], qkv[:, :, 2 * self.heads :]
        if step.cache is not None:
            k, v = step.cache.write(slot, k, v)
        else:
            k, v = k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=step.mask, is_causal=step.mask is None and t > 1, scale=self.scaling
        )
        h = self.proj(a.transpose(1, 2).reshape(b, t, self.hidden)) + h
        x = F.layer_norm(h, (self.hidden,), self.ln2_w, self.ln2_b, self.eps)
        return h + self.fc_proj(self.act(self.fc(x)))


class LeanGPT2Head(nn.Module):
    """The last unit: final LayerNorm and the (tied) LM head."""

    def __init__(self, state: dict[str, torch.Tensor], config, fmt: str):
        super().__init__()
        self.hidden = config.n_embd
        self.eps = config.layer_norm_epsilon
        self.ln_w, self.ln_b = (
            packed_vector(state["ln_f.weight"], fmt),
            packed_vector(state["ln_f.bias"], fmt),
        )
        self.lm_head = PackedLinear(state["lm_head.weight"], None, table_format(fmt))

    def forward(self, h: torch.Tensor, logits: str) -> torch.Tensor:
        if logits == "last":
            h = h[:, -1:, :]
        return self.lm_head(F.layer_norm(h, (self.hidden,), self.ln_w, self.ln_b, self.eps)).float()


class LeanGPT2Adapter(LeanAdapterMixin, GPT2Adapter):
    """GPT-2 units as lean modules in a weight format."""

    def build_lean_unit(self, u: int, state: dict[str, torch.Tensor]) -> nn.Module:
        if u == 0:
            return LeanGPT2Embed(state, self.weight_format)
        if u == self.num_units - 1:
            return LeanGPT2Head(state, self.config, self.weight_format)
        return LeanGPT2Block(state, self.config, u - 1, self.weight_format)

    def new_cache(self, start: int, end: int) -> LeanKVCache:
        """A cache for the layers among units ``[start, end)``."""
        n = len(range(max(start, 1), min(end, self.num_layers + 1)))
        c = self.config
        return self.make_cache(n, c.n_head, c.n_embd // c.n_head)

    def run(self, units: list[tuple[int, nn.Module]], inp: StageInput, cache) -> torch.Tensor:
        cache = check_cache(cache)
        h, step = inp.x, None
        last = self.num_units - 1
        for u, module in units:
            if u == 0:
                h = module(h, inp.position)
            elif u == last:
                return module(h, inp.logits)
            else:
                if step is None:
                    b, t = h.shape[:2]
                    past = 0
                    if cache is not None:
                        past = cache.seq_len
                        cache.reserve(b, past + t)
                    step = _Step(causal_mask(t, past), cache, self.layer_slots(units)[0])
                h = module(h, step, u - step.first_slot)
        return h
