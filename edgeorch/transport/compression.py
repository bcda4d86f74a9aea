"""Activation formats on a hop: fp32 (exact), bf16, or int8 with one scale per token.

A stage whose spec asks for a lossy ``activation_format`` sends its hidden
states to the next stage in that format; the receiver restores float32
before anything else reads the frame, so the stages, their checks and their
engines never see the difference. Both lossy formats describe themselves in
the frame (a bf16 ``x``; an int8 ``x`` plus a float32 ``x_scale`` of shape
``[batch, tokens, 1]`` and each token's few largest channels, exact), so no header field is needed and an fp32 receiver of
an old version refuses them with a clear 422 rather than misreading them.

The cost side (bytes per format, conversion time, which format a link
should carry) is :mod:`edgeorch.planning.formats`, pure and without torch;
its names are re-exported here. Which formats meet the quality budget is
measured, not assumed (``bench/activation_quality.py``, docs/results.md).
"""

from __future__ import annotations

from typing import Literal

import torch

from edgeorch.planning.formats import (  # noqa: F401 - the cost side, re-exported
    ACTIVATION_FORMATS,
    CONVERT_S_PER_ELEMENT,
    OUTLIERS,
    bytes_per_token,
    choose_format,
    hop_seconds,
)
from edgeorch.transport.wire import FrameError

ActivationFormat = Literal["fp32", "bf16", "int8"]
SCALE = "x_scale"
OUTLIER_INDEX = "x_outlier_index"
OUTLIER_VALUE = "x_outlier"
INT8_MAX = 127.0


class ActivationFormatError(FrameError):
    """A hop's activation tensors are not a valid fp32, bf16 or int8-with-scale encoding."""


def pack(x: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """Hidden states ``[batch, tokens, hidden]`` float32 as the tensors a hop in ``fmt`` carries."""
    if fmt == "fp32":
        return {"x": x}
    if fmt == "bf16":
        return {"x": x.to(torch.bfloat16)}
    if fmt == "int8":
        return _pack_int8(x)
    raise ActivationFormatError(f"unknown activation format {fmt!r}; known: {list(ACTIVATION_FORMATS)}")


def _pack_int8(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric int8 with one scale per token, the token's largest channels sent exactly beside it."""
    k = min(OUTLIERS, x.shape[-1])
    values, index = x.abs().topk(k, dim=-1)
    body = x.scatter(-1, index, 0.0)
    scale = (body.abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(body / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return {"x": q, SCALE: scale.float(), OUTLIER_INDEX: index.to(torch.int32),
            OUTLIER_VALUE: x.gather(-1, index)}  # fmt: skip


def _restore_int8(
    x: torch.Tensor, scale: torch.Tensor, index: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    if x.dtype != torch.int8 or x.ndim != 3 or scale.dtype != torch.float32:
        raise ActivationFormatError(
            "int8 activations need x int8 [batch, tokens, hidden] and a float32 scale"
        )
    if list(scale.shape) != [*x.shape[:2], 1] or not bool(torch.isfinite(scale).all()):
        raise ActivationFormatError(f"the scale must be finite [batch, tokens, 1], got {list(scale.shape)}")
    if index.dtype != torch.int32 or values.dtype != torch.float32 or index.shape != values.shape:
        raise ActivationFormatError("outliers need int32 channel indices and float32 values of one shape")
    if list(index.shape[:2]) != list(x.shape[:2]) or index.ndim != 3 or index.shape[2] > x.shape[2]:
        raise ActivationFormatError(f"outliers of shape {list(index.shape)} do not fit {list(x.shape)}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= x.shape[2]):
        raise ActivationFormatError(f"outlier channels must be in [0, {x.shape[2]})")
    return (x.to(torch.float32) * scale).scatter_(-1, index.to(torch.int64), values)


def restore(tensors: dict[str, torch.Tensor]) -> None:
    """Turn a received hop's ``x`` back into float32 in place (token ids and fp32 pass unchanged)."""
    x = tensors.get("x")
    parts = [tensors.pop(name, None) for name in (SCALE, OUTLIER_INDEX, OUTLIER_VALUE)]
    if all(p is None for p in parts):
        if x is not None and x.dtype in (torch.bfloat16, torch.float16):
            tensors["x"] = x.to(torch.float32)
        return
    if x is None or any(p is None for p in parts):
        raise ActivationFormatError("int8 activations need x, a scale, outlier indices and outlier values")
    tensors["x"] = _restore_int8(x, *parts)
