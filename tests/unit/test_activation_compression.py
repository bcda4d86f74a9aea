"""Activation formats on a hop: what they keep, what they refuse, and which one a link gets."""

from __future__ import annotations

import pytest
import torch

from edgeorch.transport import compression, wire
from edgeorch.transport.compression import ActivationFormatError


def _hidden(tokens: int = 6, hidden: int = 64) -> torch.Tensor:
    x = torch.randn(1, tokens, hidden)
    x[..., 5] *= 400.0  # an outlier channel, as Llama-style residual streams have
    return x


def _through_the_wire(x: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    data = wire.encode_frame(wire.Frame(tensors=compression.pack(x, fmt)))
    tensors = wire.decode_frame(data).tensors
    compression.restore(tensors)
    return tensors


def test_fp32_and_bf16_come_back_as_float32_within_their_precision() -> None:
    x = _hidden()
    assert torch.equal(_through_the_wire(x, "fp32")["x"], x)
    got = _through_the_wire(x, "bf16")
    assert set(got) == {"x"} and got["x"].dtype == torch.float32
    assert bool(((got["x"] - x).abs() <= x.abs() / 256).all())  # bf16 keeps 8 bits of mantissa


def test_int8_keeps_outliers_exact_and_the_rest_within_a_step_of_its_scale() -> None:
    x = _hidden()
    got = _through_the_wire(x, "int8")
    assert set(got) == {"x"} and got["x"].dtype == torch.float32
    assert torch.equal(got["x"][..., 5], x[..., 5])
    body = x.clone()
    body[..., 5] = 0
    # Rounding moves a value by at most half a step; the step is the token's largest non-outlier / 127.
    step = body.abs().amax(dim=-1, keepdim=True) / 127
    assert bool(((got["x"] - x).abs() <= step / 2 + 1e-6).all())
    sent = sum(t.numel() * t.element_size() for t in compression.pack(x, "int8").values())
    assert sent == x.shape[1] * compression.bytes_per_token("int8", x.shape[2])


def test_token_ids_pass_unchanged() -> None:
    tensors = {"x": torch.tensor([[1, 2, 3]])}
    compression.restore(tensors)
    assert tensors["x"].dtype == torch.int64


def test_a_malformed_int8_hop_is_refused() -> None:
    good = compression.pack(_hidden(), "int8")
    for broken in (
        {k: v for k, v in good.items() if k != compression.SCALE},
        {**good, compression.SCALE: torch.full((1, 6, 1), float("inf"))},
        {**good, compression.OUTLIER_INDEX: torch.full((1, 6, 8), 64, dtype=torch.int32)},
        {**good, "x": good["x"].float()},
    ):
        with pytest.raises(ActivationFormatError):
            compression.restore(dict(broken))
    assert issubclass(ActivationFormatError, wire.FrameError)  # the worker answers 400 bad_frame


def test_a_slow_link_gets_a_smaller_format_and_a_fast_one_keeps_fp32() -> None:
    hidden, tokens = 2048, 512
    assert compression.bytes_per_token("int8", hidden) < compression.bytes_per_token("bf16", hidden) // 1.5
    slow = 10e6 / 8  # 10 Mbit/s
    assert compression.choose_format(tokens, hidden, slow) == "int8"
    assert compression.choose_format(tokens, hidden, slow, allowed=("fp32", "bf16")) == "bf16"
    assert compression.choose_format(tokens, hidden, 10e9 / 8) == "fp32"  # 10 Gbit/s: conversion dominates
