"""GGUF Q8_0 blocks held as they are (engine/q8_0.py): exact round trips, refusals, llama.cpp's arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeorch.engine.formats import skeleton
from edgeorch.engine.pack import synth_units
from edgeorch.engine.q8_0 import (
    MalformedBlocks,
    Q8_0Embedding,
    Q8_0Linear,
    dequantize_q8_0,
    parse_q8_0,
    quantize_q8_0,
)
from edgeorch.engine.stage import load_stage
from edgeorch.engine.warmup import _WARM_CONFIG
from edgeorch.models.adapter import StageInput
from edgeorch.models.formats import INT4_Q8_0_TABLES_KEY, INT4_SCALES_KEY, q8_0_bytes


def _file_blocks(rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 bytes as gguf-py writes them (bit-exact with ggml's reference), and the float32 matrix quantised."""
    from gguf import GGMLQuantizationType, quantize

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.001, 0.2, (rows, 1))).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block: d = 0
    return quantize(w, GGMLQuantizationType.Q8_0), w


def test_parsed_blocks_dequantise_to_the_files_values_bit_for_bit() -> None:
    from gguf import GGMLQuantizationType, dequantize

    raw, _ = _file_blocks(64, 96)
    codes, scales = parse_q8_0(raw, 64, 96)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16 and tuple(scales.shape) == (64, 3)
    expected = torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q8_0))
    assert torch.equal(dequantize_q8_0(codes, scales), expected)
    # The bytes themselves are kept: codes and scales written back in block order are the file's.
    back = np.concatenate(
        [scales.numpy().view(np.uint8).reshape(-1, 2), codes.numpy().view(np.uint8).reshape(-1, 32)], 1
    )
    assert np.array_equal(back.reshape(raw.shape), raw)


def test_quantize_is_ggmls_reference_and_recovers_the_files_blocks() -> None:
    from gguf import GGMLQuantizationType, dequantize

    raw, w = _file_blocks(32, 64, seed=1)
    codes, scales = parse_q8_0(raw, 32, 64)
    ours = quantize_q8_0(torch.from_numpy(w))  # ggml's quantize_row_q8_0_ref, as gguf-py writes files
    assert torch.equal(ours[0], codes) and torch.equal(ours[1].view(torch.int16), scales.view(torch.int16))
    # A table dequantised from Q8_0 blocks quantises back to the same blocks (a load from the checkpoint).
    again = quantize_q8_0(torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q8_0)))
    assert torch.equal(again[0], codes) and torch.equal(again[1].view(torch.int16), scales.view(torch.int16))


@pytest.mark.parametrize(
    ("mutate", "rows", "cols", "match"),
    [
        (lambda b: b[:-1], 8, 64, r"is 544 bytes \(34 per 32 values\), got 543"),
        (lambda b: b, 8, 48, "columns a multiple of 32"),
        (lambda b: b, 0, 64, "positive rows"),
        (lambda b: b.view(np.int8), 8, 64, "got 544 of int8"),
        (lambda b: _with_scale(b, np.inf), 8, 64, r"block 1 of row 0 has scale inf; 1 not finite"),
        (lambda b: _with_scale(b, np.nan), 8, 64, "has scale nan"),
    ],
)
def test_malformed_blocks_are_refused_with_a_clear_error(mutate, rows, cols, match) -> None:
    raw, _ = _file_blocks(8, 64)
    with pytest.raises(MalformedBlocks, match=match):
        parse_q8_0(mutate(raw.reshape(-1).copy()), rows, cols)


def _with_scale(raw: np.ndarray, value: float) -> np.ndarray:
    raw[34:36] = np.array([value], dtype=np.float16).view(np.uint8)  # row 0, block 1
    return raw


def test_blocks_that_do_not_fit_their_scales_are_refused() -> None:
    codes = torch.zeros(4, 64, dtype=torch.int8)
    with pytest.raises(MalformedBlocks, match="do not fit scales"):
        Q8_0Linear(codes, None, (codes, torch.zeros(4, 3, dtype=torch.float16)))
    with pytest.raises(MalformedBlocks, match="int8 codes and fp16 scales"):
        Q8_0Embedding(codes, (codes, torch.zeros(4, 2, dtype=torch.float32)))


def test_lookup_gives_exactly_the_files_rows() -> None:
    raw, _ = _file_blocks(50, 64)
    codes, scales = parse_q8_0(raw, 50, 64)
    embed = Q8_0Embedding(codes, (codes, scales))
    ids = torch.tensor([[3, 0, 49, 3]])
    assert torch.equal(embed(ids), dequantize_q8_0(codes, scales)[ids])


def _ggml_vec_dot_q8_0_q8_0(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's Q8_0 x Q8_0 dot products, in float64: the activation quantised as its AVX2 path does."""
    xb = x.reshape(-1, 32).double()
    amax = xb.abs().amax(-1, keepdim=True).float()
    qx = torch.round(xb.float() * torch.where(amax > 0, 127.0 / amax, 0.0)).double()  # half to even
    dx = (amax / 127.0).half().double()
    per_block = (codes.view(codes.shape[0], -1, 32).double() * qx).sum(-1)  # integer sums, exact
    return (per_block * scales.double() * dx.squeeze(-1)).sum(-1)


def test_the_head_computes_llama_cpps_q8_0_dot_products() -> None:
    raw, _ = _file_blocks(3000, 96)  # more rows than one dequantised chunk
    codes, scales = parse_q8_0(raw, 3000, 96)
    head = Q8_0Linear(codes, None, (codes, scales))
    x = torch.randn(2, 96) * 3
    y = head(x.unsqueeze(0))
    assert y.shape == (1, 2, 3000) and y.dtype == torch.float32
    for i in range(2):
        want = _ggml_vec_dot_q8_0_q8_0(codes, scales, x[i])
        assert torch.allclose(y[0, i].double(), want, rtol=0, atol=1e-5 * want.abs().max().item())
    # Not the unquantised activation's product: the quantisation is llama.cpp's, and it shows.
    plain = x @ head.dense().t()
    assert not torch.allclose(y[0], plain, rtol=0, atol=1e-5 * plain.abs().max().item())


def test_a_skeleton_takes_the_blocks_as_they_are() -> None:
    raw, _ = _file_blocks(40, 64)
    codes, scales = parse_q8_0(raw, 40, 64)
    with skeleton():
        head = Q8_0Linear(torch.empty(40, 64, device="meta"))
    assert head.weight.device.type == "meta" and head.scales.shape == (40, 2)
    head.load_state_dict({"weight": codes, "scales": scales}, strict=True, assign=True)
    assert head.weight.data_ptr() == codes.data_ptr() and torch.equal(
        head.dense(), dequantize_q8_0(codes, scales)
    )


def test_q8_0_tables_are_held_planned_and_run_as_the_config_says(tmp_path: Path) -> None:
    cfg = {**_WARM_CONFIG, INT4_SCALES_KEY: "float32", INT4_Q8_0_TABLES_KEY: ["embed", "lm_head"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    synth_units(tmp_path, "int4")
    stage = load_stage(tmp_path, 0, 3, engine="lean", weight_format="int4")
    embed, head = stage.units[0][1].embed, stage.units[2][1].lm_head
    assert isinstance(embed, Q8_0Embedding) and isinstance(head, Q8_0Linear)
    assert embed.scales.dtype == torch.float16 and tuple(head.scales.shape) == (256, 2)
    profile = stage.adapter.profile("t", weight_format="int4")
    assert sum(u.param_bytes for u in profile.units) == stage.param_bytes()
    assert profile.units[0].param_bytes == q8_0_bytes(256, 64) == 256 * 64 * 34 // 32
    logits = stage.run(StageInput(x=torch.tensor([[1, 2, 3]])))  # the last position's
    assert logits.shape == (1, 1, 256) and torch.isfinite(logits).all()
