"""Llama-style decoders (Llama, SmolLM2, TinyLlama, Qwen2, Mistral) as a unit chain."""

from __future__ import annotations

import importlib

import torch
from torch import nn

from edgeorch.models.adapter import FamilyAdapter, StageInput, causal_mask

# model_type -> (module, decoder layer class, RMSNorm class, rotary class)
_ARCH = {
    "llama": (
        "transformers.models.llama.modeling_llama",
        "LlamaDecoderLayer",
        "LlamaRMSNorm",
        "LlamaRotaryEmbedding",
    ),
    "qwen2": (
        "transformers.models.qwen2.modeling_qwen2",
        "Qwen2DecoderLayer",
        "Qwen2RMSNorm",
        "Qwen2RotaryEmbedding",
    ),
    "mistral": (
        "transformers.models.mistral.modeling_mistral",
        "MistralDecoderLayer",
        "MistralRMSNorm",
        "MistralRotaryEmbedding",
    ),
}


class _Embed(nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)


class _Head(nn.Module):
    def __init__(self, norm: nn.Module, hidden: int, vocab: int, bias: bool = False):
        super().__init__()
        self.norm = norm
        self.lm_head = nn.Linear(hidden, vocab, bias=bias)


class LlamaAdapter(FamilyAdapter):
    """Units: token embedding, decoder layers with rotary attention, RMSNorm + LM head."""

    family = "llama"
    is_decoder = True

    def __init__(self, config):
        super().__init__(config)
        module = importlib.import_module(_ARCH[config.model_type][0])
        _, layer_cls, norm_cls, rotary_cls = _ARCH[config.model_type]
        self._layer_cls = getattr(module, layer_cls)
        self._norm_cls = getattr(module, norm_cls)
        # The rotary embedding has no weights; one instance serves every layer.
        self.rotary = getattr(module, rotary_cls)(config=config)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def build_unit(self, u: int) -> nn.Module:
        c = self.config
        if u == 0:
            return _Embed(c.vocab_size, c.hidden_size)
        if u == self.num_units - 1:
            return _Head(self._norm_cls(c.hidden_size, eps=c.rms_norm_eps), c.hidden_size, c.vocab_size)
        return self._layer_cls(c, layer_idx=u - 1)

    def checkpoint_name(self, u: int, key: str, available: set[str]) -> str:
        base = "model." if any(k.startswith("model.") for k in available) else ""
        if u == 0:
            return base + key
        if u == self.num_units - 1:
            if key.startswith("norm."):
                return base + key
            if key == "lm_head.weight" and key not in available:
                return base + "embed_tokens.weight"  # tied embeddings: the head reuses the table
            return key
        return f"{base}layers.{u - 1}.{key}"

    def kv_bytes_per_token(self, u: int, dtype_bytes: int) -> float:
        if 1 <= u <= self.num_layers:
            return 2.0 * self.config.num_key_value_heads * self.head_dim * dtype_bytes
        return 0.0

    def run(self, units: list[tuple[int, nn.Module]], inp: StageInput, cache) -> torch.Tensor:
        h = inp.x
        position_embeddings = mask = position_ids = None
        for u, module in units:
            if u == 0:
                h = module.embed_tokens(h)
            elif u == self.num_units - 1:
                h = module.norm(h)
                if inp.logits == "last":
                    h = h[:, -1:, :]
                h = module.lm_head(h)
            else:
                if position_embeddings is None:
                    q_len = h.shape[1]
                    position_ids = torch.arange(inp.position, inp.position + q_len).unsqueeze(0)
                    position_embeddings = self.rotary(h, position_ids)
                    mask = causal_mask(q_len, inp.position)
                h = module(
                    h,
                    attention_mask=mask,
                    position_ids=position_ids,
                    cache=cache,
                    use_cache=cache is not None,
                    position_embeddings=position_embeddings,
                )
        return h
