"""bench/engine_weights.py: one model written as Q4_1/Q4_0/Q8_0 GGUF files that hold the same numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.engine_roofline import gguf_read_bytes, read_bandwidth, roofline_tok_s
from bench.engine_weights import _permute, draw_model, write_gguf
from edgeorch.engine.gguf_blocks import _head_permutation

gguf = pytest.importorskip("gguf")


def test_the_converter_permutation_is_what_the_importer_undoes() -> None:
    w = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    for heads in (2, 4, 8):
        undone = torch.from_numpy(_permute(w, heads))[_head_permutation(64, heads)]
        assert torch.equal(undone, torch.from_numpy(w))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[dict, dict, Path]:
    cfg, weights = draw_model("test-tiny", seed=3)
    out = tmp_path_factory.mktemp("gguf")
    for q in ("Q4_1", "Q4_0", "Q8_0"):
        write_gguf(out / f"tiny.{q}.gguf", cfg, weights, q, "tiny", tokenizer=False)
    return cfg, weights, out


def test_the_q4_1_file_holds_the_model_exactly_and_the_others_quantise_it(tiny) -> None:
    from gguf import GGUFReader, quants

    cfg, weights, out = tiny
    for q, tol in (("Q4_1", 0.0), ("Q8_0", 0.003), ("Q4_0", 0.02)):
        tensors = {t.name: t for t in GGUFReader(str(out / f"tiny.{q}.gguf")).tensors}
        assert set(tensors) == set(weights)
        for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.1.ffn_down.weight"):
            t = tensors[name]
            assert t.tensor_type.name == q
            got = quants.dequantize(t.data, t.tensor_type).reshape(weights[name].shape)
            kind = name.split(".")[-2]
            heads = cfg["num_attention_heads"] if kind == "attn_q" else cfg["num_key_value_heads"]
            want = _permute(weights[name], heads) if kind in ("attn_q", "attn_k") else weights[name]
            assert np.abs(got - want).max() <= tol, (q, name)
        assert tensors["token_embd.weight"].tensor_type.name == "Q8_0"
        # Both tables are in the file; the token table is read one row per token.
        assert gguf_read_bytes(out / f"tiny.{q}.gguf") == sum(
            int(t.n_bytes) for n, t in tensors.items() if n != "token_embd.weight"
        )


def test_the_read_bandwidth_is_measured_and_turns_into_a_rate() -> None:
    bw = read_bandwidth(1, repeats=2, nbytes=64 << 20)
    assert 1e8 < bw < 1e12
    assert roofline_tok_s(bw, int(bw / 10)) == pytest.approx(10.0)
