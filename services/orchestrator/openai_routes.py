"""The OpenAI-compatible gateway: chat completions, completions (both streamable), embeddings, models.

``model`` names a deployment. Generation runs through the deployment's
active chain via :mod:`edgeorch.orchestration.generation`, which carries a
session over a stage that dies; the text comes from one
:class:`~edgeorch.orchestration.text.TextStream`, so streamed and
non-streamed answers are the same text.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from functools import partial
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from edgeorch.orchestration.generation import ChainFailure, SessionStats, encode, generate
from edgeorch.orchestration.text import TextStream, chat_prompt_ids, stop_token_ids
from edgeorch.schemas.stage import Sampling
from services.orchestrator.gateway_auth import require_api_key
from services.orchestrator.store import NotFound

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["gateway"])
_F = {"allow_inf_nan": False}


class _Sampled(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)

    model: str = Field(min_length=1, max_length=64)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2, **_F)
    top_p: float = Field(default=1.0, gt=0, le=1, **_F)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else self.stop[:4]

    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, seed=self.seed)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=1_000_000)


class ChatRequest(_Sampled):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Sampled):
    prompt: str | list[str] = Field(description="one prompt (a list of exactly one is accepted)")


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=64)
    input: str | list[str] = Field(description="text or a list of texts (at most 256)")
    encoding_format: Literal["float"] = "float"


def _deployment(request: Request, name: str, kind: str) -> None:
    try:
        actual = request.app.state.book.kind(name)
    except NotFound as exc:
        raise HTTPException(404, f"no deployment {name!r}; GET /v1/models lists them") from exc
    if actual != kind:
        raise HTTPException(422, f"deployment {name!r} is an {actual}; this endpoint needs a {kind}")


def _max_tokens(request: Request, value: int | None, default: int) -> int:
    limit = request.app.state.settings.max_tokens_limit
    n = value or default
    if n > limit:
        raise HTTPException(422, f"max_tokens {n} is above this gateway's limit of {limit}")
    return n


async def _run(request: Request, name: str, ids: list[int], max_tokens: int, body: _Sampled,
               stream: TextStream) -> AsyncIterator[tuple[str, str | None]]:  # fmt: skip
    """Yield (delta, finish_reason) pairs; finish_reason set on the last one."""
    state = request.app.state
    stop_ids = stop_token_ids(state.book.tokenizers[name])  # once, not per token
    stats, finish, t0 = SessionStats(), "length", time.perf_counter()
    try:
        async for token in generate(state.data_http, state.routes, name, ids, max_tokens,
                                    body.sampling(), stop_ids, stats,
                                    on_step=partial(state.routes.step_seen, name)):  # fmt: skip
            if token in stop_ids:
                finish = "stop"
                break
            delta = stream.push(token)
            if delta:
                yield delta, None
            if stream.stopped:
                finish = "stop"
                break
    except ChainFailure:
        state.routes.observe(name, failed=True)
        state.metrics.requests.labels(name, "generate", "failed").inc()
        raise
    state.routes.observe(name, failed=False)
    _count(state.metrics, name, stats, time.perf_counter() - t0)
    yield stream.finish(), finish


def _count(metrics, name: str, stats: SessionStats, wall_s: float) -> None:
    metrics.requests.labels(name, "generate", "ok").inc()
    metrics.tokens.labels(name).inc(len(stats.step_s))
    metrics.request_seconds.labels(name).observe(wall_s)
    for s in stats.step_s[1:]:
        metrics.step_seconds.labels(name).observe(s)
    if len(stats.step_s) > 1:
        metrics.tokens_per_s.labels(name).set((len(stats.step_s) - 1) / sum(stats.step_s[1:]))
    if stats.recoveries:
        metrics.recoveries.labels(name).inc(stats.recoveries)


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _answer(request: Request, name: str, ids: list[int], max_tokens: int, body: _Sampled, chat: bool):
    tok = request.app.state.book.tokenizers[name]
    cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    usage_prompt = len(ids)
    stream = TextStream(tok, body.stops())

    def choice(delta: str, finish: str | None, streaming: bool) -> dict:
        if not chat:
            return {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
        if streaming:
            return {"index": 0, "delta": {"content": delta} if delta else {}, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": delta}, "finish_reason": finish}

    obj = "chat.completion" if chat else "text_completion"
    if not body.stream:
        parts, finish = [], "length"
        try:
            async for delta, fin in _run(request, name, ids, max_tokens, body, stream):
                parts.append(delta)
                finish = fin or finish
        except ChainFailure as exc:
            raise HTTPException(exc.status, exc.detail) from exc
        n_out = len(stream.ids)
        return {"id": cid, "object": obj, "created": created, "model": name,
                "choices": [choice("".join(parts), finish, False)],
                "usage": {"prompt_tokens": usage_prompt, "completion_tokens": n_out,
                          "total_tokens": usage_prompt + n_out}}  # fmt: skip

    chunk_obj = "chat.completion.chunk" if chat else "text_completion"

    async def events() -> AsyncIterator[str]:
        head = {"id": cid, "object": chunk_obj, "created": created, "model": name}
        if chat:
            yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]})  # fmt: skip
        try:
            async for delta, fin in _run(request, name, ids, max_tokens, body, stream):
                if delta or fin:
                    yield _sse({**head, "choices": [choice(delta, fin, True)]})
        except ChainFailure as exc:
            yield _sse({"error": {"message": exc.detail, "code": exc.status}})
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    """OpenAI chat completions through the deployment's split model (``stream: true`` for SSE)."""
    _deployment(request, body.model, "decoder")
    tok = request.app.state.book.tokenizers[body.model]
    ids = await run_in_threadpool(chat_prompt_ids, tok, [m.model_dump() for m in body.messages])
    max_tokens = _max_tokens(request, body.max_completion_tokens or body.max_tokens, 128)
    return await _answer(request, body.model, ids, max_tokens, body, chat=True)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    """OpenAI text completions (the prompt as given, no chat template)."""
    _deployment(request, body.model, "decoder")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1 or not prompts[0]:
        raise HTTPException(422, "prompt must be one non-empty string (batches: POST /v1/jobs)")
    tok = request.app.state.book.tokenizers[body.model]
    ids = list(tok(prompts[0])["input_ids"])
    return await _answer(
        request, body.model, ids, _max_tokens(request, body.max_tokens, 16), body, chat=False
    )


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> dict:
    """OpenAI embeddings from an encoder deployment (pooled, normalised)."""
    _deployment(request, body.model, "encoder")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not 1 <= len(texts) <= 256 or not all(texts):
        raise HTTPException(422, "input must be 1 to 256 non-empty strings")
    tok = request.app.state.book.tokenizers[body.model]
    enc = await run_in_threadpool(lambda: tok(texts, padding=True, truncation=True, return_tensors="pt"))
    state = request.app.state
    try:
        emb = await encode(state.data_http, state.routes, body.model, enc["input_ids"],
                           enc["attention_mask"])  # fmt: skip
    except ChainFailure as exc:
        state.metrics.requests.labels(body.model, "embeddings", "failed").inc()
        raise HTTPException(exc.status, exc.detail) from exc
    state.metrics.requests.labels(body.model, "embeddings", "ok").inc()
    n = int(enc["attention_mask"].sum())
    return {"object": "list", "model": body.model,
            "data": [{"object": "embedding", "index": i, "embedding": row.tolist()} for i, row in enumerate(emb)],
            "usage": {"prompt_tokens": n, "total_tokens": n}}  # fmt: skip


@router.get("/v1/models")
async def models(request: Request) -> dict:
    """Every deployment, as OpenAI models."""
    book = request.app.state.book
    names = await run_in_threadpool(book.store.names)
    data = []
    for n in names:
        row = await run_in_threadpool(book.store.get, n)
        data.append({"id": n, "object": "model", "created": int(row.created_at), "owned_by": "edgeorch",
                     "root": row.model, "state": row.state})  # fmt: skip
    return {"object": "list", "data": data}
