"""Real models through real worker chains give exactly the unsplit model's output."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from edgeorch.engine import load_adapter
from edgeorch.local.chain import start_chain
from edgeorch.local.launcher import CLI

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a transformer model is.",
    "List three prime numbers.",
    "How do I boil an egg?",
]
NEW_TOKENS = 32


def _chat_ids(tok, prompt: str) -> list[int]:
    return tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True
    )["input_ids"]


@pytest.fixture(scope="module")
def smollm(store):
    d = store.path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(str(d))
    ref = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    expected = {}
    for p in PROMPTS:
        ids = _chat_ids(tok, p)
        out = ref.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
        expected[p] = out[0, len(ids) :].tolist()
    return tok, expected


@pytest.mark.slow
@pytest.mark.parametrize(
    "ranges",
    [[(0, 11), (11, 21), (21, 32)], [(0, 7), (7, 13), (13, 19), (19, 26), (26, 32)]],
    ids=["3-workers", "5-workers"],
)
def test_smollm2_split_is_token_identical(store, smollm, tmp_path, ranges) -> None:
    tok, expected = smollm
    chain = start_chain("smollm2-135m", ranges, model_store=store.root, log_dir=tmp_path)
    try:
        for p in PROMPTS:
            gen = chain.client.generate(_chat_ids(tok, p), NEW_TOKENS, stop_ids={tok.eos_token_id})
            assert gen.token_ids == expected[p], p
            assert len(gen.steps[0].hops) == len(ranges)
    finally:
        chain.close()
    assert tok.decode(expected[PROMPTS[0]], skip_special_tokens=True) == "The capital of France is Paris."


@pytest.mark.slow
def test_minilm_split_over_two_workers_equals_unsplit(store, tmp_path) -> None:
    d = store.path("minilm-l6")
    tok = AutoTokenizer.from_pretrained(str(d))
    texts = ["Edge inference splits a model.", "The quick brown fox jumps over the lazy dog, twice."]
    enc = tok(texts, padding=True, return_tensors="pt")
    ref = AutoModel.from_pretrained(str(d)).eval()
    with torch.no_grad():
        hidden = ref(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), p=2, dim=1)
    chain = start_chain("minilm-l6", [(0, 4), (4, 8)], model_store=store.root, log_dir=tmp_path)
    try:
        got = chain.client.encode(enc["input_ids"], enc["attention_mask"])
    finally:
        chain.close()
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_gpt2_split_over_two_workers_gives_the_same_logits(store, tmp_path) -> None:
    d = store.path("tiny-gpt2")
    ref = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    ids = torch.randint(0, ref.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids).logits
    chain = start_chain("tiny-gpt2", [(0, 3), (3, 6)], model_store=store.root, log_dir=tmp_path)
    try:
        got = chain.client.logits(ids)
    finally:
        chain.close()
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_chain_command_answers_and_reports_hops(store) -> None:
    cmd = [*CLI, "chain", "--model", "smollm2-135m", "--stages",
           "0:11,11:21,21:32", "--prompt", "What is the capital of France?", "--max-tokens", "32", "--json"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout)
    profile = load_adapter(store.path("smollm2-135m"), "lean", "fp32").profile("smollm2-135m")
    assert result["text"] == "The capital of France is Paris."
    assert len(result["hops"]) == 3 and all(h["decode_compute_ms"] > 0 for h in result["hops"])
    assert result["hops"][1]["bytes_in_decode"] > 576 * 4  # one fp32 hidden vector plus the header
    # What each worker holds: fp32 weights of its units, and the KV its spec plans for.
    assert [h["param_bytes"] for h in result["hops"]] == [
        sum(u.param_bytes for u in profile.units[a:b]) for a, b in ((0, 11), (11, 21), (21, 32))
    ]
    assert all(h["kv_bytes"] > 0 for h in result["hops"])
    plain = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=300, check=True)
    assert plain.stdout.strip() == "The capital of France is Paris."


@pytest.mark.slow
def test_chain_command_rejects_a_bad_split(store) -> None:
    cmd = [*CLI, "chain", "--model", "smollm2-135m", "--stages", "0:11,12:32",
           "--prompt", "hi"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "does not follow 11" in out.stderr
