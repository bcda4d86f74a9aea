"""Lean BERT-style encoder units (all-MiniLM and kin): post-norm layers, q/k/v fused.

An encoder has no KV cache: every request is whole sequences with a padding
mask. The pooling unit is the reference's (masked mean, L2 normalisation),
computed in float32 whatever the format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeorch.engine.base import LeanAdapterMixin
from edgeorch.engine.formats import PackedEmbedding, PackedLinear, packed_vector
from edgeorch.engine.lean_gpt2 import activation
from edgeorch.models.adapter import StageInput
from edgeorch.models.bert import BertAdapter


class LeanBertEmbed(nn.Module):
    """Unit 0: word + token type (0) + absolute position embeddings, then LayerNorm."""

    def __init__(self, state: dict[str, torch.Tensor], config, fmt: str):
        super().__init__()
        p = "embeddings."
        self.hidden = config.hidden_size
        self.eps = config.layer_norm_eps
        self.words = PackedEmbedding(state[p + "word_embeddings.weight"], fmt)
        self.positions = PackedEmbedding(state[p + "position_embeddings.weight"], fmt)
        self.types = PackedEmbedding(state[p + "token_type_embeddings.weight"], fmt)
        self.ln_w = packed_vector(state[p + "LayerNorm.weight"], fmt)
        self.ln_b = packed_vector(state[p + "LayerNorm.bias"], fmt)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        h = self.words(ids) + self.types(torch.zeros_like(positions))
        h = h + self.positions(positions)
        return F.layer_norm(h, (self.hidden,), self.ln_w, self.ln_b, self.eps)


class LeanBertLayer(nn.Module):
    """Self-attention + residual + LayerNorm, then MLP + residual + LayerNorm."""

    def __init__(self, state: dict[str, torch.Tensor], config, fmt: str):
        super().__init__()
        self.hidden = config.hidden_size
        self.heads = config.num_attention_heads
        self.head_dim = self.hidden // self.heads
        self.eps = config.layer_norm_eps
        a = "attention.self."
        qkv_w = torch.cat([state[a + n + ".weight"] for n in ("query", "key", "value")])
        qkv_b = torch.cat([state[a + n + ".bias"] for n in ("query", "key", "value")])
        self.qkv = PackedLinear(qkv_w, qkv_b, fmt)
        self.attn_out = PackedLinear(
            state["attention.output.dense.weight"], state["attention.output.dense.bias"], fmt
        )
        self.ln1_w = packed_vector(state["attention.output.LayerNorm.weight"], fmt)
        self.ln1_b = packed_vector(state["attention.output.LayerNorm.bias"], fmt)
        self.fc = PackedLinear(state["intermediate.dense.weight"], state["intermediate.dense.bias"], fmt)
        self.fc_out = PackedLinear(state["output.dense.weight"], state["output.dense.bias"], fmt)
        self.ln2_w = packed_vector(state["output.LayerNorm.weight"], fmt)
        self.ln2_b = packed_vector(state["output.LayerNorm.bias"], fmt)
        self.act = activation(config.hidden_act, fmt)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = h.shape
        qkv = self.qkv(h).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask, scale=self.head_dim**-0.5)
        h = F.layer_norm(self.attn_out(a.transpose(1, 2).reshape(b, t, self.hidden)) + h,
                         (self.hidden,), self.ln1_w, self.ln1_b, self.eps)  # fmt: skip
        return F.layer_norm(
            self.fc_out(self.act(self.fc(h))) + h, (self.hidden,), self.ln2_w, self.ln2_b, self.eps
        )


class LeanBertPool(nn.Module):
    """The last unit: masked mean over tokens, then L2 normalisation (no weights)."""

    def forward(self, h: torch.Tensor, mask2d: torch.Tensor) -> torch.Tensor:
        weights = mask2d.unsqueeze(-1).to(h.dtype)
        summed = (h * weights).sum(dim=1)
        return F.normalize(summed / weights.sum(dim=1).clamp(min=1e-9), p=2, dim=1)


class LeanBertAdapter(LeanAdapterMixin, BertAdapter):
    """BERT-style encoder units as lean modules in a weight format."""

    def build_lean_unit(self, u: int, state: dict[str, torch.Tensor]) -> nn.Module:
        if u == 0:
            return LeanBertEmbed(state, self.config, self.weight_format)
        if u == self.num_units - 1:
            return LeanBertPool()
        return LeanBertLayer(state, self.config, self.weight_format)

    def run(self, units: list[tuple[int, nn.Module]], inp: StageInput, cache) -> torch.Tensor:
        h = inp.x
        mask2d = inp.attention_mask
        if mask2d is None:
            mask2d = torch.ones(h.shape[0], h.shape[1], dtype=torch.long)
        # Keys that are padding get no weight; None (no padding) lets SDPA take its fastest path.
        mask = None if bool(mask2d.all()) else mask2d.bool()[:, None, None, :]
        last = self.num_units - 1
        for u, module in units:
            if u == 0:
                h = module(h)
            elif u == last:
                return module(h, mask2d)
            else:
                h = module(h, mask)
        return h
