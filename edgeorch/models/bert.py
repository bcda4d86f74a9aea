"""BERT-style sentence encoders (all-MiniLM and kin) as a unit chain.

Units: embeddings, encoder layers, and a parameter-free head that mean-pools
over the attention mask and L2-normalises — what sentence-transformers'
Transformer → Pooling(mean) → Normalize pipeline computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer

from edgeorch.models.adapter import FamilyAdapter, StageInput


class _Embed(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embeddings = BertEmbeddings(config)


class _MeanPool(nn.Module):
    """Masked mean over tokens, then L2 normalisation. No weights."""


class BertAdapter(FamilyAdapter):
    """Encoder: no KV cache, a whole sequence per request, a pooled vector out."""

    family = "bert"
    is_decoder = False

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def build_unit(self, u: int) -> nn.Module:
        if u == 0:
            return _Embed(self.config)
        if u == self.num_units - 1:
            return _MeanPool()
        return BertLayer(self.config, layer_idx=u - 1)

    def checkpoint_name(self, u: int, key: str, available: set[str]) -> str:
        base = "bert." if any(k.startswith("bert.") for k in available) else ""
        if u == 0:
            return base + key
        return f"{base}encoder.layer.{u - 1}.{key}"

    def run(self, units: list[tuple[int, nn.Module]], inp: StageInput, cache) -> torch.Tensor:
        h = inp.x
        mask2d = inp.attention_mask
        if mask2d is None:
            mask2d = torch.ones(h.shape[0], h.shape[1], dtype=torch.long)
        layer_mask = None
        for u, module in units:
            if u == 0:
                h = module.embeddings(input_ids=h)
            elif u == self.num_units - 1:
                weights = mask2d.unsqueeze(-1).to(h.dtype)
                summed = (h * weights).sum(dim=1)
                h = F.normalize(summed / weights.sum(dim=1).clamp(min=1e-9), p=2, dim=1)
            else:
                if layer_mask is None:
                    layer_mask = create_bidirectional_mask(
                        config=self.config, inputs_embeds=h, attention_mask=mask2d
                    )
                out = module(h, attention_mask=layer_mask)
                h = out[0] if isinstance(out, tuple) else out
        return h
