"""The OpenAI-compatible gateway: chat completions, completions (both streamable), embeddings, models.

``model`` names a deployment. Generation runs through the deployment's
active chain via :mod:`edgeorch.orchestration.generation`, which carries a
session over a stage that dies; the text comes from one
:class:`~edgeorch.orchestration.text.TextStream`, so streamed and
non-streamed answers are the same text. ``n`` choices are ``n`` independent
sessions run at once. What the requests accept, and the 400 for every field
the gateway does not implement, is in ``openai_schemas.py``; the answers'
shapes in ``openai_answers.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from edgeorch.orchestration.admission import Admission, QueueFull
from edgeorch.orchestration.generation import ChainFailure, SessionStats, SessionTainted, encode, generate
from edgeorch.orchestration.text import TextStream, chat_prompt_ids, stop_token_ids
from edgeorch.runtime.logprobs import LogprobsError, TokenLogprobs, read_logprobs
from edgeorch.transport import wire
from services.orchestrator.gateway_auth import require_api_key
from services.orchestrator.openai_answers import (
    ChoiceState,
    chat_logprobs,
    completion_logprobs,
    embedding_value,
    merge,
    usage,
)
from services.orchestrator.openai_errors import GatewayError
from services.orchestrator.openai_schemas import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    Unsupported,
    _Sampled,
    refuse_unsupported_chat,
    refuse_unsupported_completion,
    refuse_unsupported_embedding,
)
from services.orchestrator.store import NotFound

log = logging.getLogger(__name__)
TAINT_RETRIES = 2  # a whole answer is generated again at most this often after a failed spot check

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["gateway"])
_BAD_REQUEST = {400: {"description": "a field the gateway does not implement, named in the detail"}}


def _refuse(check: Callable[[object], None], body: object) -> None:
    try:
        check(body)
    except Unsupported as exc:
        raise GatewayError(400, str(exc), exc.field) from exc


def _deployment(request: Request, name: str, kind: str) -> None:
    try:
        actual = request.app.state.book.kind(name)
    except NotFound as exc:
        raise GatewayError(404, f"no deployment {name!r}; GET /v1/models lists them", "model") from exc
    if actual != kind:
        raise GatewayError(422, f"deployment {name!r} is an {actual}; this endpoint needs a {kind}", "model")


def _max_tokens(request: Request, name: str, prompt_tokens: int, value: int | None, default: int) -> int:
    """The tokens to generate: within the gateway's limit, and prompt + generation within the context."""
    limit = request.app.state.settings.max_tokens_limit
    n = value or default
    if n > limit:
        raise GatewayError(422, f"max_tokens {n} is above this gateway's limit of {limit}", "max_tokens")
    context = request.app.state.book.context_tokens(name)
    if context is not None and prompt_tokens >= context:
        raise GatewayError(400, f"the prompt is {prompt_tokens} tokens; {name!r} reads at most {context}",
                           "messages" if "chat" in request.url.path else "prompt")  # fmt: skip
    if context is not None and prompt_tokens + n > context:
        if value is not None:  # asked for explicitly: say so rather than cut the answer short
            raise GatewayError(400, f"prompt ({prompt_tokens} tokens) + max_tokens ({n}) passes the "
                                    f"{context}-token context of {name!r}", "max_tokens")  # fmt: skip
        n = context - prompt_tokens  # the default: as many as fit
    return n


def _admission(request: Request, name: str) -> Admission:
    state = request.app.state
    admission = state.admissions.get(name)
    if admission is None:
        s = state.settings
        admission = state.admissions[name] = Admission(s.max_sessions, s.max_waiting_sessions)
    return admission


def _step_seen(request: Request, name: str) -> Callable[[int, float], None]:
    """Tell the controller of a decode step and how many of the deployment's sessions were running."""
    routes, admission = request.app.state.routes, _admission(request, name)
    return lambda version, step_s: routes.step_seen(name, version, step_s, admission.running)


def _logprob_reader(top: int | None, sink: list[TokenLogprobs]) -> Callable[[wire.Frame], None] | None:
    if top is None:
        return None

    def read(frame: wire.Frame) -> None:
        try:
            sink.append(read_logprobs(frame, top))
        except LogprobsError as exc:
            raise ChainFailure(502, f"the last stage answered unusable log-probabilities: {exc}") from exc

    return read


async def _run(request: Request, name: str, ids: list[int], max_tokens: int, body: _Sampled,
               choice: ChoiceState, top: int | None) -> AsyncIterator[tuple[ChoiceState, str, str | None]]:  # fmt: skip
    """Yield (choice, delta, finish_reason); finish_reason set on the last one."""
    state = request.app.state
    stats, t0, got = SessionStats(), time.perf_counter(), []
    stream = choice.stream
    try:
        async with _admission(request, name).slot():
            async for item in _tokens(request, name, ids, max_tokens, body, choice, top, stats, got):
                yield item
    except ChainFailure:
        state.routes.observe(name, failed=True)
        state.metrics.requests.labels(name, "generate", "failed").inc()
        raise
    state.routes.observe(name, failed=False)
    _count(state.metrics, name, stats, time.perf_counter() - t0)
    if stats.move_paths:
        await state.routes.session_moved(name, stats.move_paths)
    yield choice, stream.finish(), choice.finish


async def _tokens(request: Request, name: str, ids: list[int], max_tokens: int, body: _Sampled,
                  choice: ChoiceState, top: int | None, stats: SessionStats,
                  got: list[TokenLogprobs]) -> AsyncIterator[tuple[ChoiceState, str, str | None]]:  # fmt: skip
    """The text deltas of one session's generation (stop tokens and strings end it)."""
    state, stream = request.app.state, choice.stream
    stop_ids = stop_token_ids(state.book.tokenizers[name])  # once, not per token
    async for token in generate(state.data_http, state.routes, name, ids, max_tokens,
                                body.sampling(choice.index), stop_ids, stats,
                                on_step=_step_seen(request, name), logprobs=top,
                                on_result=_logprob_reader(top, got), settle=not body.stream,
                                batcher=state.step_batcher):  # fmt: skip
        lp = got.pop() if got else None
        if token in stop_ids:
            choice.finish = "stop"
            break
        if lp is not None:
            choice.logprobs.append(lp)
        delta = stream.push(token)
        if delta:
            yield choice, delta, None
        if stream.stopped:
            choice.finish = "stop"
            break


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


class _Answer:
    """One request's answer: its choices, and how each is written (chat or completions)."""

    def __init__(self, request: Request, name: str, ids: list[int], body: _Sampled, chat: bool,
                 top: int | None, echo: str = ""):  # fmt: skip
        self.request, self.name, self.ids, self.body = request, name, ids, body
        self.chat, self.top = chat, top
        self.tok = request.app.state.book.tokenizers[name]
        self.echo = echo
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.choices = [ChoiceState(i, TextStream(self.tok, body.stops())) for i in range(body.choices())]

    def head(self, streaming: bool) -> dict:
        obj = (
            ("chat.completion.chunk" if streaming else "chat.completion") if self.chat else "text_completion"
        )
        return {"id": self.id, "object": obj, "created": self.created, "model": self.name}

    def logprobs(self, c: ChoiceState, items: list[TokenLogprobs]) -> dict | None:
        if self.top is None:
            return None
        if self.chat:
            return chat_logprobs(self.tok, items)
        out = completion_logprobs(self.tok, items, c.offset)
        c.offset += sum(len(t) for t in out["tokens"])
        return out

    def choice(self, c: ChoiceState, text: str, finish: str | None, streaming: bool) -> dict:
        items = c.unsent_logprobs() if streaming else c.logprobs
        lp = self.logprobs(c, items)
        if not self.chat:
            return {"index": c.index, "text": text, "logprobs": lp, "finish_reason": finish}
        if streaming:
            delta = {"content": text} if text else {}
            return {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return {"index": c.index, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": lp, "finish_reason": finish}  # fmt: skip

    def usage(self) -> dict:
        return usage(len(self.ids), sum(len(c.stream.ids) for c in self.choices))

    def runs(self, max_tokens: int) -> list[AsyncIterator[tuple[ChoiceState, str, str | None]]]:
        return [
            _run(self.request, self.name, self.ids, max_tokens, self.body, c, self.top) for c in self.choices
        ]

    async def whole(self, max_tokens: int) -> dict:
        for attempt in range(TAINT_RETRIES + 1):
            try:
                texts = await self._collect(max_tokens)
                break
            except SessionTainted as exc:
                # Nothing was sent yet: generate it again, on a route without the suspect node.
                if attempt == TAINT_RETRIES:
                    raise GatewayError(exc.status, exc.detail) from None
                log.warning("%s: answer generated again from its prompt: %s", self.name, exc.detail[:300])
                self.choices = [
                    ChoiceState(c.index, TextStream(self.tok, self.body.stops())) for c in self.choices
                ]
        choices = [
            self.choice(c, self.echo + text, c.finish, False)
            for c, text in zip(self.choices, texts, strict=True)
        ]
        return {**self.head(False), "choices": choices, "usage": self.usage()}

    async def _collect(self, max_tokens: int) -> list[str]:
        async def collect(run: AsyncIterator[tuple[ChoiceState, str, str | None]]) -> str:
            return "".join([delta async for _, delta, _ in run])

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(collect(run)) for run in self.runs(max_tokens)]
        except* ChainFailure as failures:
            tainted = [e for e in failures.exceptions if isinstance(e, SessionTainted)]
            if tainted:
                raise tainted[0] from None
            exc = failures.exceptions[0]
            raise GatewayError(exc.status, exc.detail) from None
        return [t.result() for t in tasks]

    async def events(self, max_tokens: int) -> AsyncIterator[str]:
        head = self.head(True)
        extra = {"usage": None} if self.body.include_usage() else {}
        for c in self.choices:
            if self.chat:
                first = {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}  # fmt: skip
                yield _sse({**head, "choices": [first], **extra})
            elif self.echo:
                yield _sse({**head, "choices": [self.choice(c, self.echo, None, True)], **extra})
        try:
            async for c, delta, fin in merge(self.runs(max_tokens)):
                if delta or fin or (self.top is not None and c.sent_logprobs < len(c.logprobs)):
                    yield _sse({**head, "choices": [self.choice(c, delta, fin, True)], **extra})
        except ChainFailure as exc:
            yield _sse({"error": {"message": exc.detail, "code": exc.status}})
            yield _sse("[DONE]")
            return
        if extra:
            yield _sse({**head, "choices": [], "usage": self.usage()})
        yield _sse("[DONE]")


async def _respond(answer: _Answer, max_tokens: int):
    """The answer, once the deployment has room (else 429); ``max_tokens`` already fits the context."""
    admission, n = _admission(answer.request, answer.name), len(answer.choices)
    try:
        admission.admit(n)
    except QueueFull as exc:
        retry = {"Retry-After": str(max(1, round(exc.retry_after_s)))}
        raise GatewayError(429, str(exc), None, retry) from exc
    if not answer.body.stream:
        try:
            return await answer.whole(max_tokens)
        finally:
            admission.finished(n)
    return StreamingResponse(
        admission.held_stream(n, answer.events(max_tokens)), media_type="text/event-stream"
    )


@router.post("/v1/chat/completions", responses=_BAD_REQUEST)
async def chat_completions(body: ChatRequest, request: Request):
    """OpenAI chat completions through the deployment's split model (``stream: true`` for SSE).

    Supported: messages (text content; system, developer, user, assistant), max_tokens /
    max_completion_tokens, temperature, top_p, stop, seed, n (1..16, choice i uses seed + i), stream,
    stream_options.include_usage, logprobs and top_logprobs (0..20), user. Other fields get a 400.
    """
    _refuse(refuse_unsupported_chat, body)
    _deployment(request, body.model, "decoder")
    tok = request.app.state.book.tokenizers[body.model]
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
                for i, m in enumerate(body.messages)]  # fmt: skip
    ids = await run_in_threadpool(chat_prompt_ids, tok, messages)
    max_tokens = _max_tokens(
        request, body.model, len(ids), body.max_completion_tokens or body.max_tokens, 128
    )
    return await _respond(_Answer(request, body.model, ids, body, True, body.top()), max_tokens)


@router.post("/v1/completions", responses=_BAD_REQUEST)
async def completions(body: CompletionRequest, request: Request):
    """OpenAI text completions (the prompt as given, no chat template).

    Supported: prompt (one string), max_tokens, temperature, top_p, stop, seed, n, stream,
    stream_options.include_usage, echo, logprobs (0..5; not with echo), user. Other fields get a 400.
    """
    _refuse(refuse_unsupported_completion, body)
    _deployment(request, body.model, "decoder")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1 or not prompts[0]:
        raise GatewayError(422, "prompt must be one non-empty string (batches: POST /v1/jobs)", "prompt")
    tok = request.app.state.book.tokenizers[body.model]
    ids = list(tok(prompts[0])["input_ids"])
    answer = _Answer(request, body.model, ids, body, False, body.logprobs, prompts[0] if body.echo else "")
    return await _respond(answer, _max_tokens(request, body.model, len(ids), body.max_tokens, 16))


@router.post("/v1/embeddings", responses=_BAD_REQUEST)
async def embeddings(body: EmbeddingRequest, request: Request) -> dict:
    """OpenAI embeddings from an encoder deployment (pooled, normalised).

    Supported: input (1 to 256 strings), encoding_format float or base64 (little-endian float32),
    dimensions (only the model's own size), user. Other fields get a 400.
    """
    _refuse(refuse_unsupported_embedding, body)
    _deployment(request, body.model, "encoder")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not 1 <= len(texts) <= 256 or not all(texts):
        raise GatewayError(422, "input must be 1 to 256 non-empty strings", "input")
    tok = request.app.state.book.tokenizers[body.model]
    enc = await run_in_threadpool(lambda: tok(texts, padding=True, truncation=True, return_tensors="pt"))
    state = request.app.state
    try:
        emb = await encode(state.data_http, state.routes, body.model, enc["input_ids"],
                           enc["attention_mask"])  # fmt: skip
    except ChainFailure as exc:
        state.metrics.requests.labels(body.model, "embeddings", "failed").inc()
        raise GatewayError(exc.status, exc.detail) from exc
    if body.dimensions is not None and body.dimensions != emb.shape[1]:
        raise GatewayError(400, f"dimensions: {body.model!r} embeds in {emb.shape[1]} dimensions; "
                                 "other sizes are not supported", "dimensions")  # fmt: skip
    state.metrics.requests.labels(body.model, "embeddings", "ok").inc()
    n = int(enc["attention_mask"].sum())
    data = [{"object": "embedding", "index": i, "embedding": embedding_value(row, body.encoding_format)}
            for i, row in enumerate(emb)]  # fmt: skip
    return {
        "object": "list",
        "model": body.model,
        "data": data,
        "usage": {"prompt_tokens": n, "total_tokens": n},
    }


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
