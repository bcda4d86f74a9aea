"""The gateway's OpenAI layer without a stack: refusals, the logprobs result frame, answer formatting."""

from __future__ import annotations

import asyncio
import base64
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from edgeorch import wire
from edgeorch.runtime.logprobs import (
    LOGPROBS_FORMAT,
    LogprobsError,
    TokenLogprobs,
    logprob_tensors,
    read_logprobs,
)
from edgeorch.schemas.stage import ForwardMeta
from services.orchestrator.openai_answers import (
    chat_logprobs,
    completion_logprobs,
    embedding_value,
    merge,
    token_bytes,
)
from services.orchestrator.openai_schemas import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    Unsupported,
    refuse_unsupported_chat,
    refuse_unsupported_completion,
    refuse_unsupported_embedding,
)

MSG = [{"role": "user", "content": "hi"}]


def _result(logits: torch.Tensor, token: int, top: int) -> wire.Frame:
    frame = wire.Frame(meta={"session": "s", "token": token, "position": 3, "logprobs_format": LOGPROBS_FORMAT},
                       tensors=logprob_tensors(logits, token, top))  # fmt: skip
    return wire.decode_frame(wire.encode_frame(frame))  # through the wire, as the gateway reads it


def test_logprobs_travel_as_the_few_numbers_asked_for_and_read_back_exactly() -> None:
    logits = torch.randn(1, 4, 50, generator=torch.Generator().manual_seed(0))
    frame = _result(logits, 7, 3)
    want = torch.log_softmax(logits[0, -1], -1)
    got = read_logprobs(frame, 3, 50)
    assert got.token == 7 and got.logprob == pytest.approx(want[7].item(), abs=1e-6)
    values, ids = torch.topk(want, 3)
    assert [i for i, _ in got.top] == ids.tolist()
    assert [v for _, v in got.top] == pytest.approx(values.tolist(), abs=1e-6)
    assert frame.nbytes() == 4 + 3 * 12
    assert read_logprobs(_result(logits, 7, 0), 0).top == ()


def _tamper(frame: wire.Frame, **changes) -> wire.Frame:
    meta = {**frame.meta, **changes.pop("meta", {})}
    tensors = {**frame.tensors, **changes}
    return wire.Frame(meta=meta, tensors={k: v for k, v in tensors.items() if v is not None})


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"meta": {"logprobs_format": 2}}, "logprobs_format 2"),
        ({"meta": {"token": "7"}}, "integer 'token'"),
        ({"top_ids": None}, "'top_ids' must be int64 [3]"),
        ({"top_ids": torch.zeros(2, dtype=torch.int64)}, "got int64 [2]"),
        ({"top_logprobs": torch.zeros(3, dtype=torch.float16)}, "got float16"),
        ({"token_logprob": torch.tensor([0.5])}, "<= 0"),
        ({"token_logprob": torch.tensor([math.nan])}, "<= 0"),
        ({"top_ids": torch.tensor([1, 2, 99])}, "in the vocabulary"),
        ({"top_ids": torch.tensor([1, -2, 3])}, "in the vocabulary"),
    ],
)
def test_a_result_frame_inconsistent_with_the_request_is_refused(change: dict, fragment: str) -> None:
    frame = _result(torch.randn(1, 1, 50), 7, 3)
    with pytest.raises(LogprobsError, match=fragment.replace("[", r"\[")):
        read_logprobs(_tamper(frame, **change), 3, 50)


def test_an_impossible_token_is_reported_as_openai_does() -> None:
    logits = torch.zeros(1, 1, 4)
    logits[0, 0, 2] = -math.inf
    got = read_logprobs(_result(logits, 2, 1), 1)
    assert got.logprob == -9999.0


def test_forward_meta_bounds_the_logprobs_request() -> None:
    assert ForwardMeta.model_validate({"session": "s", "logprobs": {"top": 20}}).logprobs.top == 20
    for bad in ({"top": 21}, {"top": -1}, {"top": 1, "extra": 1}):
        with pytest.raises(ValidationError):
            ForwardMeta.model_validate({"session": "s", "logprobs": bad})


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
        ({"audio": {"voice": "x"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"frequency_penalty": 1.0}, "frequency_penalty"),
        ({"store": True}, "store"),
        ({"prediction": {"type": "content"}}, "prediction"),
        ({"brand_new_field": 1}, "brand_new_field"),
        (
            {"stream": True, "stream_options": {"continuous_usage_stats": True}},
            "stream_options.continuous_usage_stats",
        ),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name"),
        (
            {"messages": [{"role": "assistant", "content": None, "tool_calls": [{}]}]},
            "messages[0].tool_calls",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "messages[0].content[0].type",
        ),
    ],
)
def test_chat_fields_the_gateway_does_not_implement_are_refused_by_name(extra: dict, field: str) -> None:
    body = ChatRequest.model_validate({"model": "m", "messages": MSG, **extra})
    with pytest.raises(Unsupported) as err:
        refuse_unsupported_chat(body)
    assert err.value.field == field and str(err.value).startswith(field + ":")


def test_values_that_ask_for_nothing_are_accepted() -> None:
    body = ChatRequest.model_validate({
        "model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}]}, *MSG],
        "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "presence_penalty": 0,
        "frequency_penalty": 0.0, "logit_bias": {}, "store": False, "user": "u", "parallel_tool_calls": True,
        "stream": True, "stream_options": {"include_usage": True}, "logprobs": True, "n": 3, "seed": 5,
    })  # fmt: skip
    refuse_unsupported_chat(body)
    assert body.messages[0].text(0) == "a" and body.top() == 0 and body.include_usage()
    assert [body.sampling(i).seed for i in range(3)] == [5, 6, 7]


def test_completions_and_embeddings_refusals() -> None:
    for extra, field in (({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of"),
                         ({"echo": True, "logprobs": 1}, "logprobs")):  # fmt: skip
        with pytest.raises(Unsupported, match=f"^{field}:"):
            refuse_unsupported_completion(
                CompletionRequest.model_validate({"model": "m", "prompt": "p", **extra})
            )
    refuse_unsupported_completion(
        CompletionRequest.model_validate({"model": "m", "prompt": "p", "best_of": 1})
    )
    with pytest.raises(Unsupported, match="^extra_thing:"):
        refuse_unsupported_embedding(
            EmbeddingRequest.model_validate({"model": "m", "input": "x", "extra_thing": 1})
        )
    with pytest.raises(ValidationError):  # outside the API's own ranges: 422 as any bad value
        ChatRequest.model_validate({"model": "m", "messages": MSG, "n": 17})


def test_base64_embeddings_are_little_endian_float32() -> None:
    row = torch.tensor([0.5, -1.25, 3.0e-8])
    raw = base64.b64decode(embedding_value(row, "base64"))
    assert np.array_equal(np.frombuffer(raw, "<f4"), row.numpy()) and len(raw) == 12
    assert embedding_value(row, "float") == row.tolist()


def test_token_bytes_are_exact_for_byte_level_tokens(store) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(store.path("smollm2-135m")))
    text = "héllo ✓ world"
    ids = tok(text)["input_ids"]
    # "✓" is three bytes split over three tokens: each alone is not text, together they are.
    assert b"".join(token_bytes(tok, i) for i in ids) == text.encode()
    items = [TokenLogprobs(i, -0.5, ((i, -0.5),)) for i in ids]
    entries = chat_logprobs(tok, items)["content"]
    assert bytes(sum((e["bytes"] for e in entries), [])) == text.encode()
    legacy = completion_logprobs(tok, items[:3], offset=10)
    assert "".join(legacy["tokens"]) == "héllo" and legacy["text_offset"] == [10, 11, 12]


def test_merge_interleaves_streams_and_raises_the_first_error() -> None:
    async def gen(name: str, n: int, fail: bool = False):
        for i in range(n):
            await asyncio.sleep(0)
            yield f"{name}{i}"
        if fail:
            raise RuntimeError(f"{name} failed")

    async def collect(streams):
        return [x async for x in merge(streams)]

    out = asyncio.run(collect([gen("a", 3), gen("b", 3)]))
    assert sorted(out) == ["a0", "a1", "a2", "b0", "b1", "b2"] and out != sorted(out)
    with pytest.raises(RuntimeError, match="b failed"):
        asyncio.run(collect([gen("a", 50), gen("b", 1, fail=True)]))
