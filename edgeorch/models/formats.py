"""What a unit weighs in each weight format: the byte rule the profile and the lean engine share.

The unit profile the planner sees (:mod:`edgeorch.models.adapter`) and the
modules a worker loads (:mod:`edgeorch.engine.formats`) both size weights
with :func:`matrix_bytes`, :func:`vector_bytes` and
:func:`unit_weight_bytes`, so they agree by construction; a unit test holds
them to it. The lean engine builds on this module, never the other way.
"""

from __future__ import annotations

from typing import get_args

import torch
from torch import nn

from edgeorch.schemas.profile import WeightFormat

FORMATS: tuple[str, ...] = get_args(WeightFormat)

# int8 scales and int4 scales/zeros are bf16: the kernels take them so.
_SCALE_BYTES = 2
INT4_GROUP = 32
# A config key: "float32" when the model's int4 units hold float32 scales and zeros (a GGUF's
# Q4 blocks taken as they are: edgeorch.engine.gguf_blocks), whose matmuls then run in float32.
INT4_SCALES_KEY = "edgeorch_int4_scales"
# A config key: the tables ("embed", "lm_head") whose int4 units hold a GGUF's own Q8_0 blocks (int8
# codes and one fp16 scale per 32 values: edgeorch.engine.q8_blocks) instead of per-row int8.
INT4_Q8_0_TABLES_KEY = "edgeorch_int4_q8_0_tables"
Q8_0_BLOCK = 32


def int4_scale_bytes(config) -> int:
    """Bytes of each int4 scale and zero of a model: 4 for GGUF-block int4, else 2 (bf16)."""
    return 4 if getattr(config, INT4_SCALES_KEY, None) == "float32" else _SCALE_BYTES


def int4_q8_0_tables(config) -> frozenset[str]:
    """The tables (``embed``, ``lm_head``) a model's int4 units hold as Q8_0 blocks; usually none."""
    return frozenset(getattr(config, INT4_Q8_0_TABLES_KEY, None) or ())


def q8_0_bytes(out_features: int, in_features: int) -> int:
    """Bytes of an [out, in] matrix in Q8_0 blocks: an int8 code per value, an fp16 scale per 32."""
    return out_features * in_features + out_features * (in_features // Q8_0_BLOCK) * 2


def act_dtype(fmt: str) -> torch.dtype:
    """The dtype of the residual stream, norms, attention and the KV cache: float32 in every format."""
    check_format(fmt)
    return torch.float32


def matmul_dtype(fmt: str) -> torch.dtype:
    """The dtype a format's matmuls take their input in (and return)."""
    check_format(fmt)
    return torch.float32 if fmt == "fp32" else torch.bfloat16


def table_format(fmt: str) -> str:
    """The format of embedding tables and the LM head: int4 keeps them int8."""
    return "int8" if fmt == "int4" else fmt


def check_format(fmt: str) -> None:
    """ValueError unless ``fmt`` is a known weight format."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; known: {list(FORMATS)}")


def matrix_bytes(out_features: int, in_features: int, fmt: str, int4_scale: int = _SCALE_BYTES) -> int:
    """Bytes of an [out, in] weight matrix (or an embedding table, one row per token) in ``fmt``.

    ``int4_scale``: bytes of each int4 scale and zero (:func:`int4_scale_bytes`).
    """
    check_format(fmt)
    n = out_features * in_features
    if fmt == "int4":
        return n // 2 + (in_features // INT4_GROUP) * out_features * 2 * int4_scale
    if fmt == "int8":
        return n + out_features * _SCALE_BYTES
    return n * (4 if fmt == "fp32" else 2)


def vector_bytes(n: int, fmt: str) -> int:
    """Bytes of a norm weight or bias of ``n`` elements in ``fmt``."""
    return n * act_dtype(fmt).itemsize


def unit_weight_bytes(
    module: nn.Module, fmt: str, int4_scale: int = _SCALE_BYTES, q8_0_tables: frozenset[str] = frozenset()
) -> int:
    """Bytes the lean engine holds for a unit, computed from its Hugging Face module (may be on meta).

    Every 2-D parameter is a matrix (a linear weight or an embedding table),
    the rest are vectors. Embedding tables and the LM head are stored in
    :func:`table_format`. GPT-2's Conv1D stores its weight as [in, out], so
    its output channels are the second dimension. ``q8_0_tables`` (int4
    only): the tables held as Q8_0 blocks (:func:`int4_q8_0_tables`).
    """
    from transformers.pytorch_utils import Conv1D

    total = 0
    for name, sub in module.named_modules():
        table = "embed" if isinstance(sub, nn.Embedding) else name.split(".")[-1] == "lm_head" and "lm_head"
        for p in sub.parameters(recurse=False):
            if p.ndim == 2:
                out = p.shape[1] if isinstance(sub, Conv1D) else p.shape[0]
                if fmt == "int4" and table in q8_0_tables:
                    total += q8_0_bytes(out, p.numel() // out)
                else:
                    total += matrix_bytes(
                        out, p.numel() // out, table_format(fmt) if table else fmt, int4_scale
                    )
            else:
                total += vector_bytes(p.numel(), fmt)
    return total
