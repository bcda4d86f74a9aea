"""A GGUF file's own 4-bit blocks as the engine's int4, taken as they are: no re-quantising.

llama.cpp's Q4_0 and Q4_1 store a matrix row by row in blocks of 32 input
values: 4-bit codes ``q`` (0..15) and an fp16 scale ``d`` (Q4_1: and an fp16
minimum ``m``); a weight is ``(q - 8) * d`` (Q4_0) or ``q * d + m`` (Q4_1).
The engine's int4 (``_weight_int4pack_mm_for_cpu``) has the same groups of
32 and computes ``(q - 8) * scale + zero``. So the codes map one to one,
``scale = d`` and ``zero = 0`` (Q4_0) or ``m + 8 d`` (Q4_1), with no
rounding, if scale and zero are float32 (bf16, the engine's usual int4
scale type, cannot hold an fp16 ``d``): ``(q - 8) * d`` is exact in float32,
so the kernel's weight is ``round(q d + m)``, which is what llama.cpp's own
dequantisation (and gguf-py's) computes, bit for bit, whenever ``m + 8 d``
is itself a float32 (checked per group; true for every group of SmolLM2's
file). A unit packed this way holds float32 scales and zeros, so its
matmuls take float32 activations; the model's config says so
(:data:`edgeorch.models.formats.INT4_SCALES_KEY`), so its profile counts
4-byte scales.

Rows: llama.cpp's converter permutes the rows of ``attn_q`` and ``attn_k``
for llama-architecture files (its rotary layout), and transformers undoes
that when it reads them. The permutation is not assumed: each matrix's rows
are matched against the dequantised checkpoint the import wrote (identity,
or the inverse permutation over query or KV heads), and only an exact match
of every value is taken.

Q8_0 tables (32 int8 values and one fp16 scale per block; SmolLM2's token
table, which is also its tied LM head) are taken as they are too, into the
Q8_0 layout of :mod:`edgeorch.engine.q8_0` (the engine's int8 format has one
scale per row, so they cannot be int8 without re-quantising): the config
lists them (:data:`edgeorch.models.formats.INT4_Q8_0_TABLES_KEY`), so the
skeleton and the profile hold them so. A table of another type stays per-row
int8, re-quantised from the checkpoint.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from edgeorch.engine import stage_adapter
from edgeorch.engine.formats import PackedLinear, skeleton
from edgeorch.engine.pack import unit_tensors
from edgeorch.engine.q8_0 import Q8_0Embedding, Q8_0Linear, dequantize_q8_0, parse_q8_0
from edgeorch.models import load_config
from edgeorch.models.checkpoint import CheckpointReader
from edgeorch.models.formats import INT4_GROUP, int4_q8_0_tables
from edgeorch.models.unitfile import PackedUnits, unit_file_name, write_unit_file

log = logging.getLogger(__name__)

# HF projection name -> GGUF tensor name inside block i.
_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}  # fmt: skip
# The lean layer's fused linears and the projections each one stacks, in row order.
_FUSED = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


class NotExact(ValueError):
    """The GGUF's blocks cannot be taken as the engine's int4 without rounding; re-quantise instead."""


def q4_blocks(tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[out, in]`` (int32, 0..15) and float32 ``[out, in/32, 2]`` (scale, zero) of a Q4_0/Q4_1 tensor.

    ``tensor`` is a ``gguf.GGUFReader`` tensor. NotExact for another type, or
    a Q4_1 group whose ``m + 8 d`` is not a float32.
    """
    kind = tensor.tensor_type.name
    if kind not in ("Q4_0", "Q4_1"):
        raise NotExact(f"{tensor.name} is {kind}, not Q4_0/Q4_1")
    in_f = int(tensor.shape[0])
    head = 2 if kind == "Q4_0" else 4
    blocks = np.asarray(tensor.data).reshape(-1, head + 16)
    out_f = blocks.shape[0] * INT4_GROUP // in_f
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float64)[:, 0]
    if kind == "Q4_0":
        zero = np.zeros_like(d)
    else:
        zero = blocks[:, 2:4].copy().view(np.float16).astype(np.float64)[:, 0] + 8.0 * d
        if not np.array_equal(zero.astype(np.float32).astype(np.float64), zero):
            raise NotExact(f"{tensor.name}: some group's m + 8d is not a float32")
    qs = blocks[:, head:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int32)  # byte j: value j low, j+16 high
    sz = np.stack([d, zero], axis=-1).astype(np.float32).reshape(out_f, in_f // INT4_GROUP, 2)
    return torch.from_numpy(codes.reshape(out_f, in_f)), torch.from_numpy(sz)


def q8_0_tables(gguf_path: Path) -> list[str]:
    """The tables (``embed``, ``lm_head``) a GGUF file holds as Q8_0 blocks."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(gguf_path)).tensors}
    head = tensors.get("output.weight", tensors.get("token_embd.weight"))  # no output: tied to the table
    kinds = {"embed": tensors.get("token_embd.weight"), "lm_head": head}
    return [k for k, t in kinds.items() if t is not None and t.tensor_type.name == "Q8_0"]


def _q8_0_table(tensor, want: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q8_0 tensor's (codes, scales) as they are; NotExact unless they dequantise to ``want`` exactly."""
    cols, rows = (int(n) for n in tensor.shape)
    codes, scales = parse_q8_0(np.asarray(tensor.data).reshape(-1), rows, cols)  # MalformedBlocks: refused
    if not torch.equal(dequantize_q8_0(codes, scales), want.float()):
        raise NotExact(f"{tensor.name}'s Q8_0 blocks do not dequantise to the checkpoint's table")
    return codes, scales


def dequantize_blocks(codes: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """The float32 matrix of :func:`q4_blocks`' codes, as llama.cpp computes it: ``q d + m``."""
    out_f, in_f = codes.shape
    q = codes.view(out_f, in_f // INT4_GROUP, INT4_GROUP).float() - 8.0
    return torch.addcmul(sz[..., 1:], q, sz[..., :1]).view(out_f, in_f)  # exact product, one rounding


def _head_permutation(rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation over ``heads`` heads (what transformers applies)."""
    half = rows // heads // 2
    return torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(rows)


def _matched_rows(codes: torch.Tensor, sz: torch.Tensor, want: torch.Tensor, heads: list[int]):
    """``(codes, sz)`` with rows reordered so they dequantise to ``want`` exactly; NotExact if no order does."""
    deq = dequantize_blocks(codes, sz)
    for perm in [
        None,
        *(_head_permutation(codes.shape[0], h) for h in heads if codes.shape[0] % (2 * h) == 0),
    ]:
        got = deq if perm is None else deq[perm]
        if torch.equal(got, want):
            return (codes, sz) if perm is None else (codes[perm], sz[perm])
    raise NotExact("no row order of the GGUF blocks equals the dequantised checkpoint")


def _fused(reader, cfg, block: int, names: tuple[str, ...], state: dict[str, torch.Tensor]) -> PackedLinear:
    parts = []
    for n in names:
        tensor = reader[f"blk.{block}.{_GGUF_NAMES[n]}.weight"]
        codes, sz = q4_blocks(tensor)
        parts.append(
            _matched_rows(codes, sz, state[n + ".weight"], [cfg.num_attention_heads, cfg.num_key_value_heads])
        )
    codes = torch.cat([c for c, _ in parts])
    sz = torch.cat([s for _, s in parts]).transpose(0, 1).contiguous()  # the kernel's [in/32, out, 2]
    biases = [state.get(n + ".bias") for n in names]
    bias = None if biases[0] is None else torch.cat(biases).float()
    with skeleton():  # declared only: the codes and scales are the file's, not a quantisation of ours
        linear = PackedLinear(torch.empty(codes.shape, device="meta"), bias, "int4")
    filled = {"weight": torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), "scales": sz}
    linear.load_state_dict(filled if bias is None else {**filled, "bias": bias}, strict=True, assign=True)
    return linear


def pack_gguf_int4(gguf_path: Path, model_dir: Path) -> dict:
    """Write ``packed/int4/`` of ``model_dir`` with the layers' matrices taken from the GGUF's Q4 blocks.

    ``model_dir`` holds the checkpoint dequantised from the same file, and
    its config lists the tables to take as Q8_0 blocks (:func:`q8_0_tables`;
    the others are per-row int8, packed from the checkpoint as usual).
    NotExact (nothing written) when a layer matrix is not Q4_0/Q4_1, or a
    matrix or table does not dequantise exactly to the checkpoint's;
    MalformedBlocks for Q8_0 blocks that are not well formed.
    """
    from gguf import GGUFReader

    gguf_file = GGUFReader(str(gguf_path))
    by_name = {t.name: t for t in gguf_file.tensors}
    cfg = load_config(model_dir)
    adapter = stage_adapter(cfg, "lean", "int4")
    tables = int4_q8_0_tables(cfg)
    head_name = "output.weight" if "output.weight" in by_name else "token_embd.weight"
    reader = CheckpointReader(model_dir)
    packed = PackedUnits(model_dir, "int4")
    tmp = packed.begin()
    sizes = []
    try:
        for u in range(adapter.num_units):
            state = adapter.read_unit_state(u, reader)
            module = adapter.build_lean_unit(u, state).eval()
            if 1 <= u <= adapter.num_layers:
                for attr, names in _FUSED.items():
                    setattr(module, attr, _fused(by_name, cfg, u - 1, names, state))
            elif u == 0 and "embed" in tables:  # the unit was built so (the config lists it): fill it
                table = state["embed_tokens.weight"]
                module.embed = Q8_0Embedding(table, _q8_0_table(by_name["token_embd.weight"], table))
            elif u == adapter.num_units - 1 and "lm_head" in tables:
                w = state["lm_head.weight"]
                module.lm_head = Q8_0Linear(w, state.get("lm_head.bias"), _q8_0_table(by_name[head_name], w))
            tensors, mods = unit_tensors(module)
            sizes.append(write_unit_file(tmp / unit_file_name(u), tensors, mods))
    except (NotExact, KeyError) as exc:  # KeyError: a layer matrix the file does not have
        shutil.rmtree(tmp, ignore_errors=True)
        raise NotExact(str(exc)) from exc
    record = {"num_units": adapter.num_units, "unit_bytes": sizes, "torch": torch.__version__,
              "source": f"GGUF Q4 blocks of {gguf_path.name}, taken as they are", "q8_0_tables": sorted(tables)}  # fmt: skip
    packed.commit(tmp, record)
    log.info("packed %s as int4 from its GGUF blocks: %d bytes", model_dir, sum(sizes))
    return record
