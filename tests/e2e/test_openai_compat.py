"""The official ``openai`` client, and LangChain on top of it, against a live split stack.

Every call the client makes works as the API defines it, or is refused with a
400 that names the field; nothing is silently ignored. Numbers are compared
with the unsplit model: embeddings (base64, the client's default) with the
float path and with Hugging Face's MiniLM, log-probabilities of a greedy chat
with Hugging Face's SmolLM2 log-softmax at each position.
"""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgeorch.local.scenario import parse_scenario
from edgeorch.local.stack import LocalStack
from tests.reference import sentence_embeddings
from tests.support import wait_for

pytestmark = pytest.mark.slow
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = ["edge inference splits a model by layers", "the capital of France"]
HTTP = httpx.Client(timeout=120.0)


@pytest.fixture(scope="module")
def stack(store, tmp_path_factory):
    # Three workers of 400 MB: SmolLM2 in fp32 (~750 MB with its cache) spans all of them.
    scenario = parse_scenario({"workers": [{"id": f"n{i}", "memory": "400MB"} for i in range(3)]})
    # At most 4 sessions at once and 4 waiting: every test here fits, n=16 does not (429).
    s = LocalStack(scenario, model_store=store.root, log_dir=tmp_path_factory.mktemp("compat"),
                   private_redis=True, jobs_worker=False,
                   service_env={"EDGEORCH_MAX_SESSIONS": "4", "EDGEORCH_MAX_WAITING_SESSIONS": "4"})  # fmt: skip
    try:
        s.start()
        for name, model in (("smol", "smollm2-135m"), ("minilm", "minilm-l6")):
            r = HTTP.post(f"{s.orchestrator_url}/v1/deployments", json={"name": name, "model": model},
                          headers={"authorization": f"Bearer {s.admin_token}"})  # fmt: skip
            assert r.status_code == 201, r.text
        for name in ("smol", "minilm"):
            url = f"{s.orchestrator_url}/v1/deployments/{name}"
            wait_for(lambda u=url: HTTP.get(u).json()["state"] == "ready", 180, f"{name} ready")
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{stack.orchestrator_url}/v1", api_key="unused", max_retries=0, timeout=120
    )


@pytest.fixture(scope="module")
def aclient(stack):
    """A factory: an async client is bound to the event loop it first runs on, so one per asyncio.run."""
    return lambda: openai.AsyncOpenAI(base_url=f"{stack.orchestrator_url}/v1", api_key="unused", max_retries=0,
                                      timeout=120)  # fmt: skip


@pytest.fixture(scope="module")
def smol_ref(store):
    path = str(store.path("smollm2-135m"))
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32
    ).eval()


def _ref_log_softmax(model, tok, prompt_ids: list[int], generated: list[int]) -> torch.Tensor:
    """The unsplit model's log-softmax at each generated position: [len(generated), vocab]."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + generated])).logits[0].float()
    return torch.log_softmax(logits[len(prompt_ids) - 1 : len(prompt_ids) + len(generated) - 1], dim=-1)


def test_embeddings_base64_by_default_equal_the_float_path_and_the_unsplit_model(
    client, aclient, stack, store
):
    got = np.array([d.embedding for d in client.embeddings.create(model="minilm", input=TEXTS).data])
    r = HTTP.post(f"{stack.orchestrator_url}/v1/embeddings", json={"model": "minilm", "input": TEXTS})
    floats = np.array([d["embedding"] for d in r.json()["data"]])
    assert got.shape == (2, 384) and np.abs(got - floats).max() <= 1e-6
    raw = HTTP.post(f"{stack.orchestrator_url}/v1/embeddings",
                    json={"model": "minilm", "input": TEXTS, "encoding_format": "base64"}).json()  # fmt: skip
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in raw["data"]]
    assert np.array_equal(np.array(decoded), floats.astype(np.float32))  # the same float32 bits
    want = sentence_embeddings(store.path("minilm-l6"), TEXTS).numpy()
    assert np.abs(got - want).max() <= 1e-5
    print(
        f"embeddings: base64 vs float path {np.abs(got - floats).max():.2e}, vs unsplit {np.abs(got - want).max():.2e}"
    )
    same = asyncio.run(aclient().embeddings.create(model="minilm", input=TEXTS, dimensions=384, user="u1"))
    assert np.abs(np.array([d.embedding for d in same.data]) - got).max() <= 1e-6
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="minilm", input=TEXTS, dimensions=128)


def test_greedy_chat_logprobs_equal_the_unsplit_log_softmax(client, aclient, smol_ref):
    tok, ref = smol_ref
    kw = {"model": "smol", "messages": CAPITAL, "temperature": 0, "max_tokens": 12, "logprobs": True,
          "top_logprobs": 3}  # fmt: skip
    out = client.chat.completions.create(**kw)
    content = out.choices[0].logprobs.content
    prompt = tok.apply_chat_template(CAPITAL, add_generation_prompt=True, return_dict=True)["input_ids"]
    generated = tok(out.choices[0].message.content, add_special_tokens=False)["input_ids"]
    assert "".join(t.token for t in content) == out.choices[0].message.content
    assert len(content) == len(generated) == out.usage.completion_tokens
    want = _ref_log_softmax(ref, tok, prompt, generated)
    worst = max(abs(e.logprob - want[p, generated[p]].item()) for p, e in enumerate(content))
    print(
        f"greedy chat logprobs: {len(content)} positions, largest difference to the unsplit model {worst:.2e}"
    )
    for pos, entry in enumerate(content):
        assert abs(entry.logprob - want[pos, generated[pos]].item()) <= 1e-4
        values, ids = torch.topk(want[pos], 3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([i]) for i in ids.tolist()]
        assert bytes(entry.bytes).decode() == entry.token
    # Streamed, sync and async: the same numbers, spread over the chunks.
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content
    ]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]

    async def run_async():
        async with aclient() as ac:
            whole = await ac.chat.completions.create(**kw)
            parts = [c async for c in await ac.chat.completions.create(**kw, stream=True)]
        return whole, parts

    whole, parts = asyncio.run(run_async())
    assert [t.logprob for t in whole.choices[0].logprobs.content] == [t.logprob for t in content]
    assert (
        "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
        == out.choices[0].message.content
    )


def test_completions_logprobs_echo_and_usage_chunks(client, aclient, smol_ref):
    tok, ref = smol_ref
    prompt = "The capital of France is"
    out = client.completions.create(model="smol", prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    ids = tok(prompt)["input_ids"]
    generated = tok(out.choices[0].text, add_special_tokens=False)["input_ids"]
    want = _ref_log_softmax(ref, tok, ids, generated)
    assert "".join(lp.tokens) == out.choices[0].text and len(lp.tokens) == len(generated) == 5
    assert lp.token_logprobs == pytest.approx([want[i, t].item() for i, t in enumerate(generated)], abs=1e-4)
    assert all(len(top) == 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0

    async def run_async():
        async with aclient() as ac:
            parts = [c async for c in await ac.completions.create(model="smol", prompt=prompt, max_tokens=5,
                                                                  temperature=0, logprobs=2, stream=True)]  # fmt: skip
            with pytest.raises(openai.BadRequestError, match="suffix"):
                await ac.completions.create(model="smol", prompt=prompt, max_tokens=5, suffix="!")
        return parts

    parts = [c.choices[0].logprobs for c in asyncio.run(run_async()) if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert [v for p in parts for v in p.token_logprobs] == lp.token_logprobs
    assert [o for p in parts for o in p.text_offset] == lp.text_offset
    echoed = client.completions.create(model="smol", prompt=prompt, max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + out.choices[0].text
    chunks = list(client.completions.create(model="smol", prompt=prompt, max_tokens=5, temperature=0, echo=True,
                                            stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == echoed.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.prompt_tokens == len(ids) and all(c.usage is None for c in chunks[:-1])
    chat = list(client.chat.completions.create(model="smol", messages=CAPITAL, temperature=0, max_tokens=8,
                                               stream=True, stream_options={"include_usage": True}))  # fmt: skip
    whole = client.chat.completions.create(model="smol", messages=CAPITAL, temperature=0, max_tokens=8)
    assert chat[-1].choices == [] and chat[-1].usage == whole.usage


def test_n_choices_are_independent_sessions_with_offset_seeds(client, aclient):
    kw = {"model": "smol", "messages": CAPITAL, "max_tokens": 8, "temperature": 1.0}
    two = client.chat.completions.create(**kw, n=2, seed=7)
    assert [c.index for c in two.choices] == [0, 1]
    # Choice i samples with seed + i, so each equals a one-choice request with that seed.
    used = 0
    for i, seed in enumerate((7, 8)):
        one = client.chat.completions.create(**kw, seed=seed)
        assert two.choices[i].message.content == one.choices[0].message.content
        used += one.usage.completion_tokens
    assert two.usage.completion_tokens == used and two.usage.prompt_tokens == one.usage.prompt_tokens
    greedy = client.chat.completions.create(model="smol", messages=CAPITAL, temperature=0, max_tokens=8, n=3)
    assert len({c.message.content for c in greedy.choices}) == 1 and len(greedy.choices) == 3
    one = client.chat.completions.create(model="smol", messages=CAPITAL, temperature=0, max_tokens=8)
    assert greedy.choices[0].message.content == one.choices[0].message.content
    assert greedy.usage.completion_tokens == 3 * one.usage.completion_tokens

    async def stream_two():
        texts = {0: "", 1: ""}
        async with aclient() as ac:
            async for c in await ac.chat.completions.create(**kw, n=2, seed=7, stream=True):
                for ch in c.choices:
                    texts[ch.index] += ch.delta.content or ""
        return texts

    texts = asyncio.run(stream_two())
    assert [texts[0], texts[1]] == [c.message.content for c in two.choices]


@pytest.mark.parametrize(
    ("field", "extra"),
    [
        ("response_format", {"response_format": {"type": "json_object"}}),
        ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
        ("tool_choice", {"tool_choice": "auto"}),
        ("logit_bias", {"logit_bias": {"42": 10}}),
        ("presence_penalty", {"presence_penalty": 0.5}),
        ("audio", {"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"]}),
        ("stream_options", {"stream_options": {"include_usage": True}}),  # without stream
        ("top_logprobs", {"top_logprobs": 2}),  # without logprobs
        ("no_such_field", {"extra_body": {"no_such_field": 1}}),
        (
            "messages[0].content[0].type",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                    }
                ]
            },
        ),  # fmt: skip
    ],
)
def test_unsupported_chat_fields_are_refused_with_400_naming_them(client, field, extra):
    kw = {"model": "smol", "messages": CAPITAL, "max_tokens": 2, **extra}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**kw)
    assert err.value.status_code == 400 and err.value.param == field and field in err.value.message


def test_inert_values_and_user_are_accepted_and_completions_refusals(client):
    out = client.chat.completions.create(model="smol", messages=CAPITAL, temperature=0, max_tokens=8, user="u-1",
                                         response_format={"type": "text"}, tools=[], presence_penalty=0,
                                         safety_identifier="s")  # fmt: skip
    assert out.choices[0].message.content.startswith("The capital of France")
    for field, kw in (("suffix", {"suffix": "!"}), ("best_of", {"best_of": 2}),
                      ("logprobs", {"echo": True, "logprobs": 1})):  # fmt: skip
        with pytest.raises(openai.BadRequestError, match=field):
            client.completions.create(model="smol", prompt="Hi", max_tokens=2, **kw)


def test_langchain_chat_and_embeddings_through_the_gateway(stack, client):
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings
    from pydantic import BaseModel

    base = f"{stack.orchestrator_url}/v1"
    llm = ChatOpenAI(
        model="smol", base_url=base, api_key="unused", temperature=0, max_tokens=16, max_retries=0
    )
    assert llm.invoke("What is the capital of France?").content == "The capital of France is Paris."
    assert "".join(c.content for c in llm.stream("What is the capital of France?")) == (
        "The capital of France is Paris."
    )
    with_lp = llm.bind(logprobs=True).invoke("What is the capital of France?")
    assert len(with_lp.response_metadata["logprobs"]["content"]) == with_lp.usage_metadata["output_tokens"]

    class Answer(BaseModel):
        city: str

    # Structured output asks for tools or JSON schema: refused, not answered as if it had worked.
    with pytest.raises(openai.BadRequestError) as err:
        llm.with_structured_output(Answer).invoke("What is the capital of France?")
    assert err.value.param in ("response_format", "tools")
    emb = OpenAIEmbeddings(model="minilm", base_url=base, api_key="unused", check_embedding_ctx_length=False)
    got = np.array(emb.embed_documents(TEXTS))
    want = np.array([d.embedding for d in client.embeddings.create(model="minilm", input=TEXTS).data])
    assert np.abs(got - want).max() <= 1e-6


def test_past_the_models_context_a_400_and_past_the_queue_a_429_with_retry_after(stack, client):
    long_prompt = [{"role": "user", "content": "word " * 7000}]  # ~7000 tokens + 2000 > SmolLM2's 8192
    with pytest.raises(openai.BadRequestError, match="passes the 8192-token context") as err:
        client.chat.completions.create(model="smol", messages=long_prompt, max_tokens=2000)
    assert err.value.param == "max_tokens"
    r = HTTP.post(f"{stack.orchestrator_url}/v1/chat/completions",
                  json={"model": "smol", "messages": CAPITAL, "max_tokens": 4, "n": 16})  # fmt: skip
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1 and "at most 4 run at once" in r.json()["error"]["message"]
    # Nothing was held: the next request is served.
    ok = client.chat.completions.create(model="smol", messages=CAPITAL, temperature=0, max_tokens=8)
    assert ok.choices[0].message.content.startswith("The capital of France")
