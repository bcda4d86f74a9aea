"""The lean engine through real worker chains: fp32 gives Hugging Face's greedy tokens, lossy formats their own."""

from __future__ import annotations

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgeorch.engine.stage import load_stage
from edgeorch.local.chain import parse_formats, start_chain
from edgeorch.models.adapter import StageInput
from edgeorch.models.unitfile import PackedUnits

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a transformer model is.",
    "List three prime numbers.",
    "How do I boil an egg?",
]
NEW_TOKENS = 32
RANGES = [(0, 11), (11, 21), (21, 32)]


def _chat_ids(tok, prompt: str) -> list[int]:
    return tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True
    )["input_ids"]


def _greedy(stage, ids: list[int], n: int, stop: int) -> list[int]:
    return _greedy_stages([stage], ids, n, stop)


@pytest.mark.slow
def test_lean_fp32_chain_gives_the_hf_greedy_tokens(store, tmp_path) -> None:
    d = store.path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(str(d))
    ref = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    chain = start_chain("smollm2-135m", RANGES, model_store=store.root, log_dir=tmp_path,
                        options={"engine": "lean", "format": "fp32"})  # fmt: skip
    try:
        info = httpx.get(f"{chain.workers.workers[1].url}/v1/stages/{chain.stage_ids[1]}").json()
        assert (info["engine"], info["format"]) == ("lean", "fp32")
        answers = {}
        for p in PROMPTS:
            ids = _chat_ids(tok, p)
            want = ref.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[
                0, len(ids) :
            ]
            gen = chain.client.generate(ids, NEW_TOKENS, stop_ids={tok.eos_token_id})
            assert gen.token_ids == want.tolist(), p
            answers[p] = gen.token_ids
    finally:
        chain.close()
    assert tok.decode(answers[PROMPTS[0]], skip_special_tokens=True) == "The capital of France is Paris."


@pytest.mark.slow
def test_a_chain_of_per_node_formats_gives_the_tokens_of_its_stages_run_in_one_process(
    store, tmp_path
) -> None:
    # A node short of memory takes int8, the others keep more exact weights:
    # each hop still carries float32 activations, so the chain computes what
    # the same three stages compute back to back in this process.
    formats = ["int8", "bf16", "int8"]
    d = store.path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(str(d))
    local = [
        load_stage(d, a, b, engine="lean", weight_format=f) for (a, b), f in zip(RANGES, formats, strict=True)
    ]
    chain = start_chain("smollm2-135m", RANGES, model_store=store.root, log_dir=tmp_path,
                        options=parse_formats(",".join(formats), len(RANGES)))  # fmt: skip
    try:
        infos = [
            httpx.get(f"{w.url}/v1/stages/{sid}").json()
            for w, sid in zip(chain.workers.workers, chain.stage_ids, strict=True)
        ]
        assert [i["format"] for i in infos] == formats
        if PackedUnits(d, "int8").complete():  # mapped its units' int8 files: what it holds, nothing more
            assert infos[0]["param_bytes"] <= infos[0]["bytes_read"] <= 1.05 * infos[0]["param_bytes"]
        else:
            assert infos[0]["param_bytes"] < 0.3 * infos[0]["bytes_read"]  # read fp32, hold int8
        for p in PROMPTS[:2]:
            ids = _chat_ids(tok, p)
            gen = chain.client.generate(ids, NEW_TOKENS, stop_ids={tok.eos_token_id})
            assert gen.token_ids == _greedy_stages(local, ids, NEW_TOKENS, tok.eos_token_id), p
    finally:
        chain.close()


def _greedy_stages(stages, ids: list[int], n: int, stop: int) -> list[int]:
    """Greedy tokens of stages run one after the other in this process (each with its own cache)."""
    caches = [s.new_cache() for s in stages]
    x, pos, out = torch.tensor([ids]), 0, []
    for _ in range(n):
        h = x
        for stage, cache in zip(stages, caches, strict=True):
            h = stage.run(StageInput(x=h, position=pos), cache)
            cache.advance(x.shape[1])
        pos += x.shape[1]
        out.append(int(h[0, -1].argmax()))
        if out[-1] == stop:
            break
        x = torch.tensor([[out[-1]]])
    return out
