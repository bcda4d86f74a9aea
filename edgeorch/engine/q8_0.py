"""A GGUF's own Q8_0 blocks held as they are: the token table and LM head of an imported GGUF.

llama.cpp's Q8_0 stores a matrix row by row in blocks of 32 values, each an
fp16 scale ``d`` and 32 int8 codes ``q``; a weight is ``q * d`` (ggml's
``dequantize_row_q8_0``: the fp16 ``d`` widened to float32, times the code),
which float32 holds exactly (8 + 11 significant bits). The engine's int8
format has one bf16 scale per row, so re-quantising a Q8_0 table into it
moves every weight (1.2 % RMS on SmolLM2's). This layout keeps the codes
``[rows, cols]`` (int8) and the scales ``[rows, cols / 32]`` (fp16), byte for
byte the file's 34 bytes per 32 values, and is used only for the tables of a
GGUF import whose file holds them as Q8_0
(:data:`edgeorch.models.formats.INT4_Q8_0_TABLES_KEY`); every other int8
table stays per row.

- Lookup (:class:`Q8_0Embedding`): only the looked-up rows are dequantised,
  exactly, so the rows are llama.cpp's (its ``get_rows`` dequantises the same
  way).
- Matmul (:class:`Q8_0Linear`, the LM head): llama.cpp's CPU backend
  quantises the activation of a Q8_0 matmul to Q8_0 too (the ``vec_dot_type``
  of Q8_0 is Q8_0) and computes, per block, the integer dot product of the
  codes times ``d_w * d_x``, summed in float32 (``ggml_vec_dot_q8_0_q8_0``).
  Here the activation gets the same quantisation
  (:func:`edgeorch.engine.formats.q8_round_trip`: the codes and the fp16
  ``d_x`` of its AVX2 path) and is multiplied in float32 by the exactly
  dequantised weight: the same products, summed in another order. torch has
  no grouped int8 kernel on CPU (its ``_weight_int8pack_mm`` takes one scale
  per row and, with a float32 activation, is slower than this), so the
  weight is dequantised 1024 rows at a time (2.4 MB of float32 for SmolLM2's
  576 columns, cache-sized) and each chunk multiplied with ``mm``. The cost
  against per-row int8 is in docs/results.md (issue 16).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeorch.engine.formats import _SKELETON, _frozen, _meta, q8_round_trip
from edgeorch.models.formats import Q8_0_BLOCK

_BLOCK_BYTES = 2 + Q8_0_BLOCK  # fp16 d, then 32 int8 codes
# Rows dequantised at once by Q8_0Linear: measured on SmolLM2's head (49152 x 576, 1 thread),
# 1024-2048 rows took 13-14 ms a token, 512 rows 18 ms and 4096 rows 29 ms (the chunk leaves the cache).
_CHUNK_ROWS = 1024


class MalformedBlocks(ValueError):
    """Bytes that are not a well-formed Q8_0 matrix of the stated shape."""


def q8_0_scales(raw: np.ndarray | bytes, rows: int, cols: int) -> np.ndarray:
    """The fp16 scales ``[rows, cols/32]`` of raw Q8_0 blocks, checked (the codes are not copied).

    MalformedBlocks when ``cols`` is not a multiple of 32, the byte count is
    not ``rows * cols / 32 * 34``, or a scale is not finite (inf or NaN: not
    a weight llama.cpp could have written).
    """
    if rows <= 0 or cols <= 0 or cols % Q8_0_BLOCK:
        raise MalformedBlocks(
            f"a Q8_0 matrix needs positive rows and columns a multiple of 32, got {rows} x {cols}"
        )
    data = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, bytes | bytearray) else np.asarray(raw)
    want = rows * (cols // Q8_0_BLOCK) * _BLOCK_BYTES
    if data.dtype != np.uint8 or data.size != want:
        raise MalformedBlocks(
            f"a {rows} x {cols} Q8_0 matrix is {want} bytes ({_BLOCK_BYTES} per 32 values), got {data.size}"
            + ("" if data.dtype == np.uint8 else f" of {data.dtype}")
        )
    d = data.reshape(-1, _BLOCK_BYTES)[:, :2].copy().view(np.float16).reshape(rows, cols // Q8_0_BLOCK)
    bad = ~np.isfinite(d)
    if bad.any():
        r, b = (int(i) for i in np.argwhere(bad)[0])
        raise MalformedBlocks(f"Q8_0 block {b} of row {r} has scale {d[r, b]}; {int(bad.sum())} not finite")
    return d


def parse_q8_0(raw: np.ndarray | bytes, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[rows, cols]`` (int8) and scales ``[rows, cols/32]`` (fp16) of raw Q8_0 blocks, as they are.

    MalformedBlocks as :func:`q8_0_scales` says.
    """
    d = q8_0_scales(raw, rows, cols)
    data = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, bytes | bytearray) else np.asarray(raw)
    codes = data.reshape(-1, _BLOCK_BYTES)[:, 2:].copy().view(np.int8).reshape(rows, cols)
    return torch.from_numpy(codes), torch.from_numpy(d)


def quantize_q8_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's reference Q8_0 quantisation (``quantize_row_q8_0_ref``), with which GGUF files are written.

    Per block: ``d = amax / 127`` in float32, codes ``roundf(x * (1 / d))``
    (half away from zero), and ``d`` stored as fp16. A table dequantised from
    Q8_0 blocks quantises back to the same blocks (its largest code is 127),
    so a GGUF import built from its checkpoint rather than its packed units
    still holds the file's blocks.
    """
    rows, cols = w.shape
    if cols % Q8_0_BLOCK:
        raise ValueError(f"Q8_0 needs columns divisible by {Q8_0_BLOCK}, got {cols}")
    g = w.detach().float().reshape(rows, cols // Q8_0_BLOCK, Q8_0_BLOCK)
    d = g.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    v = (g * inv).double()  # the float32 product, then rounded half away from zero (exact in float64)
    codes = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp_(-127, 127).to(torch.int8)
    return codes.reshape(rows, cols).contiguous(), d.squeeze(-1).half().contiguous()


def dequantize_q8_0(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 values of Q8_0 blocks, ``q * d`` (exact), for the rows given."""
    *lead, cols = codes.shape
    g = codes.reshape(*lead, cols // Q8_0_BLOCK, Q8_0_BLOCK).float()
    return (g * scales.float().unsqueeze(-1)).reshape(*lead, cols)


def _blocks(weight: torch.Tensor | None, codes_scales) -> tuple[torch.Tensor, torch.Tensor]:
    if codes_scales is not None:
        codes, scales = codes_scales
        if codes.dtype != torch.int8 or scales.dtype != torch.float16:
            raise MalformedBlocks(
                f"Q8_0 blocks are int8 codes and fp16 scales, got {codes.dtype}, {scales.dtype}"
            )
        rows, cols = codes.shape
        if cols % Q8_0_BLOCK or tuple(scales.shape) != (rows, cols // Q8_0_BLOCK):
            raise MalformedBlocks(f"Q8_0 codes {tuple(codes.shape)} do not fit scales {tuple(scales.shape)}")
        return codes.contiguous(), scales.contiguous()
    return quantize_q8_0(weight)


class Q8_0Embedding(nn.Module):
    """A token table held as Q8_0 blocks; the looked-up rows come out float32, exactly ``q * d``."""

    def __init__(self, table: torch.Tensor, blocks: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        rows, dim = table.shape
        if _SKELETON.get():
            self.weight = _meta((rows, dim), torch.int8)
            self.scales = _meta((rows, dim // Q8_0_BLOCK), torch.float16)
            return
        codes, scales = _blocks(table, blocks)
        self.weight, self.scales = _frozen(codes), _frozen(scales)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_q8_0(self.weight[ids], self.scales[ids])


class Q8_0Linear(nn.Module):
    """``y = q8(x) @ W.T (+ b)`` with W held as Q8_0 blocks, as llama.cpp multiplies a Q8_0 matrix."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        blocks: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if _SKELETON.get():
            self.weight = _meta((self.out_features, self.in_features), torch.int8)
            self.scales = _meta((self.out_features, self.in_features // Q8_0_BLOCK), torch.float16)
            self.bias = None if bias is None else _meta(tuple(bias.shape), torch.float32)
            return
        codes, scales = _blocks(weight, blocks)
        self.weight, self.scales = _frozen(codes), _frozen(scales)
        self.bias = None if bias is None else _frozen(bias.detach().float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = q8_round_trip(x).reshape(-1, self.in_features)
        out = torch.empty(x2.shape[0], self.out_features)
        chunk = torch.empty(min(_CHUNK_ROWS, self.out_features), self.in_features)
        blocks = self.in_features // Q8_0_BLOCK
        for start in range(0, self.out_features, _CHUNK_ROWS):
            end = min(start + _CHUNK_ROWS, self.out_features)
            w = chunk[: end - start]
            # int8 codes times their fp16 scales, widened: exactly the file's weights, in one pass.
            torch.mul(
                self.weight[start:end].view(end - start, blocks, Q8_0_BLOCK),
                self.scales[start:end].float().unsqueeze(-1),
                out=w.view(end - start, blocks, Q8_0_BLOCK),
            )
            torch.mm(x2, w.t(), out=out[:, start:end])
        y = out.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dense(self) -> torch.Tensor:
        """The float32 matrix this layer multiplies by (for tests and diagnostics)."""
        return dequantize_q8_0(self.weight, self.scales)
