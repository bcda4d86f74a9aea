"""Lean Llama-style units (Llama, SmolLM2, TinyLlama, Qwen2, Mistral).

The same arithmetic as ``LlamaDecoderLayer`` with SDPA, in fewer, larger
operations: q/k/v fused into one matmul and gate/up into another (fp32
results are bit-identical to the separate matmuls: each output is the same
dot product), RMSNorm through ``F.rms_norm``, rotary applied to queries and
keys in one go, keys and values written in place into a preallocated cache.
The order of floating-point operations inside each step follows the
reference, which is what lets fp32 reproduce the Hugging Face model bit for
bit (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgeorch.engine.base import LeanAdapterMixin, check_cache
from edgeorch.engine.formats import PackedEmbedding, PackedLinear, address_mod, packed_vector
from edgeorch.engine.kv import LeanKVCache
from edgeorch.engine.q8_0 import Q8_0Embedding, Q8_0Linear
from edgeorch.models.adapter import StageInput, causal_mask
from edgeorch.models.formats import int4_q8_0_tables, table_format
from edgeorch.models.llama import LlamaAdapter


@dataclass
class _Step:
    """What every layer of one step shares: shapes, rotary tables, mask, cache slot."""

    b: int
    t: int
    cos: torch.Tensor  # [B|1, T, 1, D]
    sin: torch.Tensor  # the rotary sine with its first half negated (see LeanLlamaLayer.forward)
    mask: torch.Tensor | None  # None: causal (prefill) or full (one token) through SDPA's own path
    cache: LeanKVCache | None
    first_slot: int


@dataclass
class _Rows:
    """What every layer of a batch of decode tokens (one per session) shares."""

    cos: torch.Tensor  # [N, 1, 1, D], each row at its own session's position
    sin: torch.Tensor
    caches: list[LeanKVCache]


class LeanEmbed(nn.Module):
    """Unit 0: the token embedding."""

    def __init__(self, state: dict[str, torch.Tensor], fmt: str, q8_0: bool = False):
        super().__init__()
        table = state["embed_tokens.weight"]
        # q8_0: a GGUF's own Q8_0 blocks (int4 units of an import; edgeorch.engine.q8_0).
        self.embed = Q8_0Embedding(table) if q8_0 else PackedEmbedding(table, fmt)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)


class LeanLlamaLayer(nn.Module):
    """One decoder layer: pre-norm attention with rotary and GQA, pre-norm SwiGLU MLP."""

    def __init__(self, state: dict[str, torch.Tensor], config, fmt: str):
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden = config.hidden_size
        self.eps = config.rms_norm_eps
        self.scaling = self.head_dim**-0.5
        att, mlp = "self_attn.", "mlp."

        def linear(*names: str) -> PackedLinear:
            weights = [state[n + ".weight"] for n in names]
            biases = [state.get(n + ".bias") for n in names]
            bias = None if biases[0] is None else torch.cat(biases)
            return PackedLinear(torch.cat(weights), bias, fmt, address_mod(*weights))

        self.ln1 = packed_vector(state["input_layernorm.weight"], fmt)
        self.qkv = linear(att + "q_proj", att + "k_proj", att + "v_proj")
        self.o = linear(att + "o_proj")
        self.ln2 = packed_vector(state["post_attention_layernorm.weight"], fmt)
        self.gate_up = linear(mlp + "gate_proj", mlp + "up_proj")
        self.down = linear(mlp + "down_proj")
        self.intermediate = self.down.in_features

    def forward(self, h: torch.Tensor, step: _Step, slot: int) -> torch.Tensor:
        """One layer on ``h`` [B*T, hidden] (rows are positions: every matmul sees a 2-D input)."""
        b, t = step.b, step.t
        q, k, v = self._project(h, b, t, step.cos, step.sin)
        if step.cache is not None:
            k, v = step.cache.write(slot, k, v)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2).to(q.dtype)
        if step.mask is None:
            a = self._attend(q, k, v, causal=t > 1)
        else:  # chunked prefill after cached tokens: HF repeats the kv heads and passes the mask
            rep = self.heads // self.kv_heads
            k = k.repeat_interleave(rep, dim=1) if rep > 1 else k
            v = v.repeat_interleave(rep, dim=1) if rep > 1 else v
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, scale=self.scaling)
        return self._finish(h, a, b * t)

    def forward_rows(self, h: torch.Tensor, rows: _Rows, slot: int) -> torch.Tensor:
        """One decode token of each of N sessions, ``h`` [N, hidden]: one matmul per projection for all.

        Attention runs per session against that session's own cache (each as
        long as its own context: nothing is padded to the longest one).
        """
        n = h.shape[0]  # the sessions' rows, then any padding rows (no cache, no attention)
        q, k, v = self._project(h, n, 1, rows.cos, rows.sin)
        heads = []
        for i, cache in enumerate(rows.caches):
            k_i, v_i = cache.write(slot, k[i : i + 1], v[i : i + 1])
            heads.append(self._attend(q[i : i + 1], k_i, v_i, causal=False))
        if n > len(heads):
            heads.append(q.new_zeros((n - len(heads), *q.shape[1:])))
        return self._finish(h, torch.cat(heads), n)

    def _project(self, h: torch.Tensor, b: int, t: int, cos: torch.Tensor, sin: torch.Tensor):
        """Queries [B, heads, T, D] and keys, values [B, T, kv_heads, D] of ``h`` [B*T, hidden], rotary applied."""
        n_qk = self.heads + self.kv_heads
        x = F.rms_norm(h, (self.hidden,), self.ln1, self.eps)
        qkv = self.qkv(x).view(b, t, n_qk + self.kv_heads, self.head_dim)
        qk = qkv[:, :, :n_qk]
        # Rotary on queries and keys at once. The reference computes
        # (x*cos) + (rotate_half(x)*sin) with rotate_half(x) = cat(-x2, x1);
        # roll(x) = cat(x2, x1) times sin with its first half negated gives
        # the same products bit for bit (negation is exact), in one op, not four.
        qk = (qk * cos) + (qk.roll(self.head_dim // 2, -1) * sin)
        return qk[:, :, : self.heads].transpose(1, 2), qk[:, :, self.heads :], qkv[:, :, n_qk:]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        # What HF's SDPA integration does on CPU without a mask: GQA inside the kernel.
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=self.scaling, enable_gqa=self.kv_heads != self.heads
        )

    def _finish(self, h: torch.Tensor, a: torch.Tensor, rows: int) -> torch.Tensor:
        """The output projection of attention ``a`` [B, heads, T, D] and the MLP, both residual."""
        h = h + self.o(a.transpose(1, 2).reshape(rows, self.heads * self.head_dim))
        x = F.rms_norm(h, (self.hidden,), self.ln2, self.eps)
        gate, up = self.gate_up(x).split(self.intermediate, dim=-1)
        return h + self.down(F.silu(gate) * up)


class LeanLlamaHead(nn.Module):
    """The last unit: final RMSNorm and the LM head."""

    def __init__(self, state: dict[str, torch.Tensor], config, fmt: str):
        super().__init__()
        self.hidden = config.hidden_size
        self.eps = config.rms_norm_eps
        self.norm = packed_vector(state["norm.weight"], fmt)
        w, bias = state["lm_head.weight"], state.get("lm_head.bias")
        if fmt == "int4" and "lm_head" in int4_q8_0_tables(config):
            self.lm_head = Q8_0Linear(w, bias)  # a GGUF's own Q8_0 blocks (edgeorch.engine.q8_0)
        else:
            self.lm_head = PackedLinear(w, bias, table_format(fmt), address_mod(w))

    def forward(self, h: torch.Tensor, logits: str) -> torch.Tensor:
        if logits == "last":
            h = h[:, -1:, :]  # RMSNorm is per position: norming only the last one is the same
        return self.lm_head(F.rms_norm(h, (self.hidden,), self.norm, self.eps)).float()


class LeanLlamaAdapter(LeanAdapterMixin, LlamaAdapter):
    """Llama-family units as lean modules in a weight format."""

    def build_lean_unit(self, u: int, state: dict[str, torch.Tensor]) -> nn.Module:
        if u == 0:
            q8_0 = self.weight_format == "int4" and "embed" in int4_q8_0_tables(self.config)
            return LeanEmbed(state, self.weight_format, q8_0)
        if u == self.num_units - 1:
            return LeanLlamaHead(state, self.config, self.weight_format)
        return LeanLlamaLayer(state, self.config, self.weight_format)

    def new_cache(self, start: int, end: int) -> LeanKVCache:
        """A cache for the layers among units ``[start, end)``."""
        n = len(range(max(start, 1), min(end, self.num_layers + 1)))
        return self.make_cache(n, self.config.num_key_value_heads, self.head_dim)

    def run(self, units: list[tuple[int, nn.Module]], inp: StageInput, cache) -> torch.Tensor:
        cache = check_cache(cache)
        h, step = inp.x, None
        last = self.num_units - 1
        for u, module in units:
            if u == 0:
                h = module(h)
            elif u == last:
                return module(h if step is None else h.view(step.b, step.t, -1), inp.logits)
            else:
                if step is None:
                    step = self._step(h, inp, cache, self.layer_slots(units)[0])
                    h = h.reshape(step.b * step.t, -1)
                h = module(h, step, u - step.first_slot)
        return h if step is None else h.view(step.b, step.t, -1)

    def run_rows(
        self,
        units: list[tuple[int, nn.Module]],
        inputs: list[StageInput],
        caches: list[LeanKVCache | None],
        row_block: int = 1,
    ) -> torch.Tensor:
        """One decode token of each of N sessions as one batch; returns [N, 1, hidden] (logits at the head).

        Each input's ``x`` is [1, 1] token ids or [1, 1, hidden]; ``caches[i]``
        is session i's own cache (None only on a stage without layers).
        ``row_block`` > 1 pads the batch with zero rows to a multiple of it, so
        that a row's result does not depend on how many others ran with it
        (docs/design.md, "Batched rows, bit for bit").
        """
        n, h, rows = len(inputs), torch.cat([inp.x for inp in inputs]), None
        padded = -(-n // row_block) * row_block
        if padded > n:  # rows of zeros (token 0): every product runs over a multiple of row_block rows
            h = torch.cat([h, h.new_zeros((padded - n, *h.shape[1:]))])
        first, last = self.layer_slots(units)[0], self.num_units - 1
        for u, module in units:
            if u == 0:
                h = module(h)
            elif u == last:
                return module(h.view(padded, 1, -1), "last")[:n]
            else:
                if rows is None:
                    rows = self._rows(h, inputs, [check_cache(c) for c in caches], padded)
                    h = h.reshape(padded, -1)
                h = module.forward_rows(h, rows, u - first)
        return h.view(padded, 1, -1)[:n]

    def _rows(
        self, h: torch.Tensor, inputs: list[StageInput], caches: list[LeanKVCache | None], padded: int
    ) -> _Rows:
        if any(c is None for c in caches):
            raise ValueError("a batch of decode tokens through layers needs every session's cache")
        for cache in caches:
            cache.reserve(1, cache.seq_len + 1)
        positions = [inp.position for inp in inputs]
        position_ids = torch.tensor([[p] for p in positions + [0] * (padded - len(positions))])
        cos, sin = self.rotary(h, position_ids)
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return _Rows(cos.unsqueeze(2), sin.unsqueeze(2), caches)

    def _step(self, h: torch.Tensor, inp: StageInput, cache: LeanKVCache | None, first: int) -> _Step:
        b, t = h.shape[:2]
        past = 0
        if cache is not None:
            past = cache.seq_len
            cache.reserve(b, past + t)
        position_ids = torch.arange(inp.position, inp.position + t).unsqueeze(0)
        cos, sin = self.rotary(h, position_ids)  # the reference's own tables, so fp32 stays bit-exact
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return _Step(b, t, cos.unsqueeze(2), sin.unsqueeze(2), causal_mask(t, past), cache, first)
