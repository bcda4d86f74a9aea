"""`edgeorch models import`: refusals leave the store unchanged; an import lands whole, packed."""

from __future__ import annotations

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
