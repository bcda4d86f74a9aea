"""GPT-2 as a unit chain: token + learned position embedding, blocks, LayerNorm + head."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from edgeorch.models.adapter import FamilyAdapter, StageInput, causal_mask


class _Embed(nn.Module):
    def __init__(self, vocab: int, positions: int, hidden: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        self.wpe = nn.Embedding(positions, hidden)


class _Head(nn.Module):
    def __init__(self, hidden: int, vocab: int, eps: float):
        super().__init__()
        self.ln_f = nn.LayerNorm(hidden, eps=eps)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)


class GPT2Adapter(FamilyAdapter):
    """Units: wte + wpe, GPT2Block × L, ln_f + LM head (tied to wte)."""

    family = "gpt2"
    is_decoder = True

    @property
    def num_layers(self) -> int:
        return self.config.n_layer

    @property
    def hidden_size(self) -> int:
        return self.config.n_embd

    def build_unit(self, u: int) -> nn.Module:
        c = self.config
        if u == 0:
            return _Embed(c.vocab_size, c.n_positions, c.n_embd)
        if u == self.num_units - 1:
            return _Head(c.n_embd, c.vocab_size, c.layer_norm_epsilon)
        return GPT2Block(c, layer_idx=u - 1)

    def checkpoint_name(self, u: int, key: str, available: set[str]) -> str:
        base = "transformer." if any(k.startswith("transformer.") for k in available) else ""
        if u == 0:
            return base + key
        if u == self.num_units - 1:
            if key == "lm_head.weight":
                return key if key in available else base + "wte.weight"
            return base + key
        return f"{base}h.{u - 1}.{key}"

    def kv_bytes_per_token(self, u: int, dtype_bytes: int) -> float:
        return 2.0 * self.config.n_embd * dtype_bytes if 1 <= u <= self.num_layers else 0.0

    def run(self, units: list[tuple[int, nn.Module]], inp: StageInput, cache) -> torch.Tensor:
        h = inp.x
        mask = None
        for u, module in units:
            if u == 0:
                positions = torch.arange(inp.position, inp.position + h.shape[1]).unsqueeze(0)
                h = module.wte(h) + module.wpe(positions)
            elif u == self.num_units - 1:
                h = module.ln_f(h)
                if inp.logits == "last":
                    h = h[:, -1:, :]
                h = module.lm_head(h)
            else:
                if mask is None:
                    mask = causal_mask(h.shape[1], inp.position)
                out = module(h, cache=cache, attention_mask=mask, use_cache=cache is not None)
                h = out[0] if isinstance(out, tuple) else out
        return h
