"""Weight formats of the lean engine: how a matrix is stored and multiplied.

Formats, chosen per stage:

- ``fp32``: weights and activations in float32. The exact mode: the lean
  engine then computes what the Hugging Face modules compute, bit for bit.
- ``bf16``: bf16 weights, matmul inputs rounded to bf16.
- ``int8``: weight-only int8 with one symmetric scale per output channel;
  ``torch.ops.aten._weight_int8pack_mm`` multiplies a bf16 activation by the
  int8 weight and applies the scales in one kernel.
- ``int4``: weight-only int4 in groups of 32 input channels, each with a bf16
  scale and zero point (``_weight_int4pack_mm_for_cpu``, the kernel gpt-fast
  uses), for the layers' matmuls; embedding tables and the LM head stay int8,
  since they are read as rows and are the most sensitive to rounding (a GGUF
  import's Q8_0 tables are held as the file's blocks instead:
  :mod:`edgeorch.engine.q8_0`).

In every format the residual stream, norms, rotary, attention and the KV
cache stay float32: only the matmuls run in the format (they read nearly all
the bytes of a decode step). Measured on SmolLM2, keeping the residual in
float32 instead of bf16 raises bf16's top-1 agreement with fp32 from 0.966 to
0.969 at no measurable cost.

Vectors (norm weights, biases) are float32. What each format weighs (the
byte rule the unit profile and these modules share) is
:mod:`edgeorch.models.formats`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from edgeorch.models.formats import INT4_GROUP, act_dtype, check_format, matmul_dtype, table_format


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row (per output channel) int8: ``weight ≈ q * scales[:, None]``.

    The scale is rounded to bf16 *before* quantising, so q is the best int8
    for the scale the kernel will actually use; the error per element is then
    at most half a step, ``scale / 2``.
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=1).clamp(min=1e-12)
    scales = (amax / 127.0).to(torch.bfloat16)
    q = torch.round(w / scales.float().unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales.contiguous()


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 matrix an int8 weight stands for."""
    return q.float() * scales.float().unsqueeze(1)


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of ``group`` input channels: codes 0..15 and bf16 (scale, zero) pairs.

    Returns the codes ``[out, in]`` (int32, unpacked) and ``[in/group, out, 2]``
    scales and zeros, in the layout of ``_weight_int4pack_mm_for_cpu``, which
    computes ``w = (q - 8) * scale + zero``. The range of each group maps onto
    the 16 codes, so a group that already lies on a 16-level grid (a
    checkpoint dequantised from a 4-bit file) is recovered up to the bf16
    rounding of its scale and zero.
    """
    w = weight.detach().float()
    out_f, in_f = w.shape
    if in_f % group:
        raise ValueError(f"int4 needs input features divisible by {group}, got {in_f}")
    g = w.view(out_f, in_f // group, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12).to(torch.bfloat16).float()
    zero = (lo + 8.0 * scale).to(torch.bfloat16).float()
    q = torch.round((g - (zero - 8.0 * scale).unsqueeze(-1)) / scale.unsqueeze(-1)).clamp_(0, 15)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return q.to(torch.int32).view(out_f, in_f), sz


def dequantize_int4(q: torch.Tensor, sz: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    """The float32 matrix int4 codes and their scales/zeros stand for."""
    out_f, in_f = q.shape
    scale = sz[..., 0].float().transpose(0, 1).unsqueeze(-1)  # [out, in/group, 1]
    zero = sz[..., 1].float().transpose(0, 1).unsqueeze(-1)
    return ((q.view(out_f, in_f // group, group).float() - 8.0) * scale + zero).view(out_f, in_f)


def q8_round_trip(x: torch.Tensor, block: int = INT4_GROUP) -> torch.Tensor:
    """``x`` as llama.cpp quantises a matmul's activation for Q4_0/Q4_1 weights (Q8_1, AVX2 path), in float32.

    Per block of 32 values: codes ``round(x * 127 / amax)`` (half to even)
    times the block's scale ``amax / 127`` rounded to fp16. Multiplying the
    GGUF's own int4 weights by this (in float32) is llama.cpp's arithmetic up
    to the order of float additions, which is what makes an imported GGUF
    write llama.cpp's greedy text (bench/gguf_text.py).
    """
    xb = x.float().reshape(-1, block)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv) * (amax / 127.0).half().float()).view(x.shape)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


# While set, the Packed* modules only declare their parameters (shape and
# dtype, on the meta device) instead of converting the weights they are given:
# a unit built so is then filled with tensors mapped from its packed unit file
# (edgeorch.models.unitfile), with no quantisation and no fp32 copy.
_SKELETON: contextvars.ContextVar[bool] = contextvars.ContextVar("edgeorch_skeleton", default=False)


@contextlib.contextmanager
def skeleton() -> Iterator[None]:
    """Build lean modules as shapes only (meta parameters), to be filled by ``load_state_dict(assign=True)``."""
    token = _SKELETON.set(True)
    try:
        yield
    finally:
        _SKELETON.reset(token)


def _meta(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    return _frozen(torch.empty(shape, dtype=dtype, device="meta"))


# Where a single-row fp32 matmul starts summing depends on the weight's
# address: MKL's sgemv peels elements until it reaches an aligned boundary, so
# the same weights at another address modulo 64 give results that differ in
# the last bits. The reference model multiplies by tensors that sit at their
# checkpoint file offsets, so to reproduce its decode steps bit for bit the
# exact (fp32) format places each matrix at the same address modulo 64.
_ALIGN = 64


def place_like(t: torch.Tensor, address_mod: int | None) -> torch.Tensor:
    """A contiguous copy of ``t`` whose data starts at ``address_mod`` modulo 64 bytes (None: anywhere)."""
    t = t.contiguous()
    if address_mod is None or address_mod % t.element_size():
        return t.clone()
    pad = _ALIGN // t.element_size()
    storage = torch.empty(t.numel() + pad, dtype=t.dtype)
    shift = ((address_mod - storage.data_ptr()) % _ALIGN) // t.element_size()
    placed = storage[shift : shift + t.numel()].view(t.shape)
    placed.copy_(t)
    return placed


def address_mod(*tensors: torch.Tensor) -> int | None:
    """The common address of ``tensors`` modulo 64 bytes, None when they differ (or have no address)."""
    if any(t.device.type == "meta" for t in tensors):
        return None
    mods = {t.data_ptr() % _ALIGN for t in tensors}
    return mods.pop() if len(mods) == 1 else None


class PackedLinear(nn.Module):
    """``y = x @ W.T + b`` with W stored in a weight format.

    Stored as parameters (requires_grad off) so every byte a unit holds is
    counted by ``module.parameters()``, quantised weights and their scales
    included. The input is cast to the format's matmul dtype; the output is
    that dtype too (float32 once a float32 bias is added).
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, address_mod: int | None = None
    ):
        super().__init__()
        check_format(fmt)
        self.fmt = fmt
        self.out_features, self.in_features = weight.shape
        self.dtype = matmul_dtype(fmt)
        self.scales = None
        out_f, in_f = self.out_features, self.in_features
        if _SKELETON.get():
            if fmt == "int4":
                self.weight = _meta((out_f, in_f // 2), torch.uint8)  # the CPU kernel's packed layout
                self.scales = _meta((in_f // INT4_GROUP, out_f, 2), torch.bfloat16)
            elif fmt == "int8":
                self.weight, self.scales = _meta((out_f, in_f), torch.int8), _meta((out_f,), torch.bfloat16)
            else:
                self.weight = _meta((out_f, in_f), self.dtype)
            self.bias = None if bias is None else _meta(tuple(bias.shape), torch.float32)
            return
        if fmt == "int4":
            q, sz = quantize_int4(weight)
            self.weight = _frozen(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            self.scales = _frozen(sz)
        elif fmt == "int8":
            q, scales = quantize_int8(weight)
            self.weight = _frozen(q)
            self.scales = _frozen(scales)
        elif fmt == "fp32":
            self.weight = _frozen(place_like(weight.detach().float(), address_mod))
        else:
            self.weight = _frozen(weight.detach().to(self.dtype).contiguous())
        # Biases are vectors: float32 like the residual stream they are added into.
        self.bias = None if bias is None else _frozen(bias.detach().float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # int4 takes its activation in its scales' dtype: bf16, or float32 for a GGUF's own blocks,
        # whose activation is then quantised as llama.cpp quantises it (q8_round_trip).
        dtype = self.scales.dtype if self.fmt == "int4" else self.dtype
        if dtype == torch.float32 and self.fmt == "int4":
            x = q8_round_trip(x)
        elif x.dtype != dtype:
            x = x.to(dtype)
        if self.fmt == "fp32":
            return F.linear(x, self.weight, self.bias)
        if self.fmt == "bf16":
            y = F.linear(x, self.weight)
        else:
            # The kernels take a 2-D activation; decode steps are [1, 1, in].
            x2 = x.reshape(-1, self.in_features)
            if self.fmt == "int8":
                y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, INT4_GROUP, self.scales)
            y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias  # bf16 + fp32 bias: a float32 result

    def dense(self) -> torch.Tensor:
        """The float32 matrix this layer multiplies by (for tests and diagnostics)."""
        if self.fmt == "int8":
            return dequantize_int8(self.weight, self.scales)
        if self.fmt == "int4":
            eye = torch.eye(self.in_features, dtype=self.scales.dtype)
            # The packed layout is the kernel's own: read it back by multiplying the identity.
            return (
                torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, INT4_GROUP, self.scales)
                .t()
                .float()
            )
        return self.weight.float()


class PackedEmbedding(nn.Module):
    """A lookup table (token or position embedding) in a weight format; rows come out float32.

    Tables are read a few rows at a time, never multiplied whole, so int4
    keeps them int8 (:func:`table_format`).
    """

    def __init__(self, table: torch.Tensor, fmt: str):
        super().__init__()
        fmt = table_format(fmt)
        check_format(fmt)
        self.fmt = fmt
        self.dtype = act_dtype(fmt)
        self.scales = None
        if _SKELETON.get():
            rows, dim = table.shape
            if fmt == "int8":
                self.weight, self.scales = _meta((rows, dim), torch.int8), _meta((rows,), torch.bfloat16)
            else:
                self.weight = _meta((rows, dim), matmul_dtype(fmt))
            return
        if fmt == "int8":
            q, scales = quantize_int8(table)
            self.weight = _frozen(q)
            self.scales = _frozen(scales)
        else:
            self.weight = _frozen(table.detach().to(matmul_dtype(fmt)).contiguous())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight).to(self.dtype)
        if self.scales is None:
            return rows
        return rows * F.embedding(ids, self.scales.unsqueeze(1))


def packed_vector(t: torch.Tensor | None, fmt: str) -> nn.Parameter | None:
    """A norm weight or bias, float32 in every format."""
    if t is None:
        return None
    if _SKELETON.get():
        return _meta(tuple(t.shape), act_dtype(fmt))
    return _frozen(t.detach().to(act_dtype(fmt)).contiguous())
