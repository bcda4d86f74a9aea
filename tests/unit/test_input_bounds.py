"""Bounds on input that used to reach a 500: model names, sampling extremes, the model's context."""

from __future__ import annotations

import json

import pytest
import torch

from edgeorch.models.store import ModelStore, ModelStoreError, model_context
from edgeorch.runtime.sampling import sample_token
from edgeorch.schemas.stage import Sampling


def _checkpoint(path, **config) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("name", ["0" * 300, "../etc", "a/b", ".hidden", "/etc", "x\x00y", "~root", ""])
def test_a_name_that_is_not_a_store_name_never_reaches_the_filesystem(tmp_path, name: str) -> None:
    with pytest.raises(ModelStoreError, match="EDGEORCH_MODEL_DIRS"):
        ModelStore(tmp_path).path(name)


def test_directories_only_inside_the_allow_list(tmp_path) -> None:
    allowed, other = tmp_path / "allowed", tmp_path / "other"
    _checkpoint(allowed / "m", n_positions=64)
    _checkpoint(other / "m", n_positions=64)
    (allowed / "escape").symlink_to(other / "m")
    store = ModelStore(tmp_path / "store", allowed_dirs=[allowed])
    assert store.path(str(allowed / "m")) == (allowed / "m").resolve()
    with pytest.raises(ModelStoreError, match="outside the allow-listed"):
        store.path(str(other / "m"))
    with pytest.raises(ModelStoreError, match="outside the allow-listed"):
        store.path(str(allowed / "escape"))  # a symlink is judged by where it leads
    with pytest.raises(ModelStoreError, match="neither a store name nor a checkpoint directory"):
        store.path(str(allowed / "missing"))
    with pytest.raises(ModelStoreError, match="usable directory path"):
        store.path(str(allowed) + "/" + "x" * 2000)


def test_a_store_name_resolves_inside_the_store(tmp_path) -> None:
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "edgeorch.json").write_text("{}")
    assert ModelStore(tmp_path).path("tiny") == tmp_path / "tiny"
    with pytest.raises(ModelStoreError, match="not in the store"):
        ModelStore(tmp_path).path("absent-1.0")


def test_model_context_reads_the_config(tmp_path) -> None:
    _checkpoint(tmp_path / "llama", max_position_embeddings=1024)
    _checkpoint(tmp_path / "gpt2", n_positions=512)
    _checkpoint(tmp_path / "none")
    assert [model_context(tmp_path / n) for n in ("llama", "gpt2", "none")] == [1024, 512, None]


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-40, 1e-8, 100.0])
@pytest.mark.parametrize("top_p", [5e-324, 1e-30, 0.5, 1.0])
def test_sampling_draws_a_token_at_any_allowed_temperature_and_top_p(
    temperature: float, top_p: float
) -> None:
    logits = torch.randn(1, 1, 1000, generator=torch.Generator().manual_seed(0)) * 30
    token = sample_token(logits, Sampling(temperature=temperature, top_p=top_p, seed=7), position=3)
    assert 0 <= token < 1000
    if temperature < 1e-8 or top_p < 1e-20:  # effectively greedy: only the likeliest token has mass
        assert token == int(logits.argmax())
