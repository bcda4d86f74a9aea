"""The packed per-unit store: a unit mapped from its file is the unit a load-time load builds, bit for bit.

Each test packs into a temporary directory that links the store's
checkpoint files, so the shared store is never written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgeorch.engine import load_adapter
from edgeorch.engine.pack import pack_model, synth_units, unit_tensors
from edgeorch.engine.stage import LoadedStage, load_stage
from edgeorch.models.adapter import StageInput
from edgeorch.models.unitfile import PackedUnits, UnitFileError, map_unit_file, write_unit_file
from edgeorch.runtime.memory import OverMemory, check_budget


def _linked(store, name: str, tmp_path: Path) -> Path:
    d = tmp_path / name
    d.mkdir()
    for f in store.path(name).iterdir():
        if f.is_file():
            (d / f.name).symlink_to(f)
    return d


def _decode(stage, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Prefill ``ids`` then feed back the greedy token ``steps`` times; every output."""
    cache = stage.new_cache()
    out = [stage.run(StageInput(x=ids), cache)]
    cache.advance(ids.shape[1])
    for i in range(steps):
        nxt = out[-1][:, -1:].argmax(-1)
        out.append(stage.run(StageInput(x=nxt, position=ids.shape[1] + i), cache))
        cache.advance(1)
    return out


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4"])
def test_packed_units_compute_what_load_time_units_compute(store, tmp_path, fmt) -> None:
    d = _linked(store, "tiny-llama", tmp_path)
    ref = load_stage(d, 0, 6, engine="lean", weight_format=fmt)  # no packed files yet: built from fp32
    assert not ref.tensors_read[0].startswith("unit-")
    pack_model(d, fmt)
    got = load_stage(d, 0, 6, engine="lean", weight_format=fmt)
    assert got.tensors_read == [f"unit-{u:05d}.safetensors" for u in range(6)]
    assert got.param_bytes() == ref.param_bytes()
    # The bytes read are the units' files: what they hold plus headers and alignment gaps.
    assert got.param_bytes() <= got.bytes_read <= 1.01 * got.param_bytes() + 6 * 4096
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    for a, b in zip(_decode(ref, ids, 6), _decode(got, ids, 6), strict=True):
        assert torch.equal(a, b)


def test_smollm2_int8_and_int4_from_packed_files_give_the_same_tokens(store, tmp_path) -> None:
    d = _linked(store, "smollm2-135m", tmp_path)
    ids = torch.tensor([[1, 9690, 28, 260, 3365, 314, 253]])
    for fmt in ("int8", "int4"):
        ref = load_stage(d, 0, 32, engine="lean", weight_format=fmt)
        pack_model(d, fmt)
        got = load_stage(d, 11, 32, engine="lean", weight_format=fmt)
        first = load_stage(d, 0, 11, engine="lean", weight_format=fmt)
        assert got.bytes_read + first.bytes_read < 0.3 * ref.bytes_read  # never the fp32 checkpoint
        want = [o[:, -1].argmax(-1).item() for o in _decode(ref, ids, 8)]
        # Split in two stages from the packed files: run the first, hand its output to the second.
        c1, c2 = first.new_cache(), got.new_cache()
        toks, x, pos = [], ids, 0
        for _ in range(9):
            h = first.run(StageInput(x=x, position=pos), c1)
            logits = got.run(StageInput(x=h, position=pos), c2)
            c1.advance(x.shape[1])
            c2.advance(x.shape[1])
            pos += x.shape[1]
            toks.append(logits[:, -1].argmax(-1).item())
            x = torch.tensor([[toks[-1]]])
        assert toks == want, fmt


@pytest.mark.parametrize(("name", "fmt"), [("tiny-gpt2", "int4"), ("minilm-l6", "int8")])
def test_other_families_pack_too(store, tmp_path, name, fmt) -> None:
    d = _linked(store, name, tmp_path)
    ref = load_stage(d, 0, 3, engine="lean", weight_format=fmt)
    pack_model(d, fmt)
    got = load_stage(d, 0, 3, engine="lean", weight_format=fmt)
    assert got.tensors_read[0].startswith("unit-")
    ids = torch.tensor([[1, 50, 60, 70]])
    assert torch.equal(ref.run(StageInput(x=ids)), got.run(StageInput(x=ids)))


def test_an_incomplete_packed_directory_is_never_used(store, tmp_path) -> None:
    d = _linked(store, "tiny-llama", tmp_path)
    pack_model(d, "int8")
    (PackedUnits(d, "int8").dir / "index.json").unlink()  # as if the pack was interrupted before its end
    got = load_stage(d, 0, 2, engine="lean", weight_format="int8")
    assert "model.embed_tokens.weight" in got.tensors_read  # fell back to the checkpoint


def test_a_truncated_unit_file_is_refused(tmp_path) -> None:
    path = tmp_path / "u.safetensors"
    write_unit_file(path, {"w": torch.arange(1000, dtype=torch.float32)}, {"w": 40})
    assert map_unit_file(path)["w"].data_ptr() % 64 == 40  # placed where it was asked to be
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(UnitFileError, match="truncated"):
        map_unit_file(path)


def test_synth_units_write_a_runnable_model_unit_by_unit(store, tmp_path) -> None:
    d = tmp_path / "synth"
    d.mkdir()
    (d / "config.json").symlink_to(store.path("tiny-llama") / "config.json")
    synth_units(d, "int4")
    stage = load_stage(d, 0, 6, engine="lean", weight_format="int4")
    profile = load_adapter(d, "lean", "int4").profile("synth")
    assert stage.param_bytes() == sum(u.param_bytes for u in profile.units)
    logits = stage.run(StageInput(x=torch.tensor([[1, 2, 3]])), stage.new_cache())
    assert logits.shape == (1, 1, 49152) and torch.isfinite(logits).all()


def test_the_budget_names_the_bytes() -> None:
    check_budget(1000, 400, 500, 100, "stage s")  # exactly at the cap is allowed
    check_budget(None, 10**12, 10**12, 0, "stage s")  # no cap
    with pytest.raises(
        OverMemory, match=r"needs 601 bytes \(501 of weights \+ 100 of planned KV\).*1 bytes over"
    ):
        check_budget(1000, 400, 501, 100, "stage s")


def test_packed_fp32_layers_keep_the_reference_alignment_bit_for_bit(store, tmp_path) -> None:
    # One-row fp32 matmuls sum in an order that depends on the weight's address
    # modulo 64 (engine/formats.py, place_like): SmolLM2's layers at another
    # alignment give other last bits, so this checks the unit files keep it.
    d = store.path("smollm2-135m")
    ref = load_stage(d, 1, 4, engine="lean", weight_format="fp32")
    adapter = ref.adapter
    units = []
    for u, module in ref.units:
        tensors, mods = unit_tensors(module)
        write_unit_file(tmp_path / f"{u}.safetensors", tensors, mods)
        units.append((u, adapter.load_packed_unit(u, map_unit_file(tmp_path / f"{u}.safetensors"))))
    got = LoadedStage(d, adapter, 1, 4, units, 0, 0.0)
    for (_, a), (_, b) in zip(ref.units, got.units, strict=True):
        want = {k: v.data_ptr() % 64 for k, v in a.state_dict().items()}
        assert {k: v.data_ptr() % 64 for k, v in b.state_dict().items()} == want
    torch.manual_seed(0)
    h = torch.randn(1, 6, 576)
    c1, c2 = ref.new_cache(), got.new_cache()
    for pos, x in [(0, h), *[(6 + i, h[:, i : i + 1] * 0.5) for i in range(4)]]:
        assert torch.equal(
            ref.run(StageInput(x=x, position=pos), c1), got.run(StageInput(x=x, position=pos), c2)
        )
        c1.advance(x.shape[1])
        c2.advance(x.shape[1])
