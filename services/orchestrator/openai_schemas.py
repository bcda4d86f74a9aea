"""What the OpenAI-compatible gateway accepts, and how it refuses what it does not implement.

Every field of the OpenAI API that the gateway does not implement is refused
with a 400 that names it (``tools``, ``response_format`` other than text,
``audio``, ...), never ignored: a caller who asked for JSON mode or a tool
call must not get an answer that looks like one. A field sent with a value
that asks for nothing (``null``, ``tools: []``, ``presence_penalty: 0``,
``response_format: {"type": "text"}``) is accepted. Fields the API defines
as identifiers with no effect on the answer (``user``,
``safety_identifier``) are accepted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgeorch.schemas.stage import Sampling

_F = {"allow_inf_nan": False}


class Unsupported(ValueError):
    """A request field the gateway does not implement (or a combination it cannot honour)."""

    def __init__(self, field: str, why: str):
        super().__init__(f"{field}: {why}")
        self.field = field


def _none(v: Any) -> bool:
    return v is None


def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {}


def _zero(v: Any) -> bool:
    return v is None or v == 0


# Fields of the OpenAI API the gateway does not implement, with the values
# that ask for nothing and so are accepted. Anything else is refused.
_INERT_COMMON: dict[str, Callable[[Any], bool]] = {
    "frequency_penalty": _zero,
    "presence_penalty": _zero,
    "logit_bias": _empty,
    "metadata": _empty,
    "store": lambda v: v in (None, False),
    "service_tier": lambda v: v in (None, "auto", "default"),
}
_INERT_CHAT: dict[str, Callable[[Any], bool]] = {
    **_INERT_COMMON,
    "tools": _empty,
    "functions": _empty,
    "tool_choice": lambda v: v in (None, "none"),
    "function_call": lambda v: v in (None, "none"),
    "parallel_tool_calls": lambda v: True,  # says how to call tools, and tools are refused
    "response_format": lambda v: v is None or v == {"type": "text"},
    "modalities": lambda v: v is None or v == ["text"],
    "audio": _none,
    "prediction": _none,
    "reasoning_effort": _none,
    "verbosity": _none,
    "web_search_options": _none,
    "prompt_cache_key": _none,
}
_INERT_COMPLETION: dict[str, Callable[[Any], bool]] = {
    **_INERT_COMMON,
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: v in (None, ""),
}
_STREAM_OPTIONS_INERT: dict[str, Callable[[Any], bool]] = {
    "include_obfuscation": lambda v: v in (None, False),
    "continuous_usage_stats": lambda v: v in (None, False),
}
SUPPORTED_NOTE = (
    "Fields not listed here are refused with 400 naming the field, unless sent with a value that asks "
    "for nothing (null, [], 0, response_format {'type': 'text'}, tool_choice 'none')."
)


class _Open(BaseModel):
    # Extra fields are kept, then refused by name (refuse_unsupported), not dropped.
    model_config = ConfigDict(extra="allow", json_schema_extra={"description": SUPPORTED_NOTE})


class StreamOptions(_Open):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage and no choices."""

    include_usage: bool = False


class _Sampled(_Open):
    model: str = Field(min_length=1, max_length=64)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=1.0, ge=0, le=2, **_F)
    top_p: float | None = Field(default=1.0, gt=0, le=1, **_F)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=1, ge=1, le=16, description="independent choices; choice i uses seed + i")
    user: str | None = Field(default=None, max_length=256, description="an end-user id; accepted, not used")
    safety_identifier: str | None = Field(default=None, max_length=256, description="accepted, not used")

    def stops(self) -> list[str]:
        """The stop strings (at most 4, as the API allows: more are refused)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else self.stop

    def sampling(self, choice: int = 0) -> Sampling:
        """The sampler of choice ``choice``: the seed is offset by the choice index."""
        seed = None if self.seed is None else (self.seed + choice) % 2**63
        temperature = 1.0 if self.temperature is None else self.temperature
        return Sampling(temperature=temperature, top_p=1.0 if self.top_p is None else self.top_p, seed=seed)

    def choices(self) -> int:
        """How many choices to generate."""
        return self.n or 1

    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class TextPart(_Open):
    """One part of a message's content; only text parts are supported."""

    type: str
    text: str | None = Field(default=None, max_length=1_000_000)


class ChatMessage(_Open):
    """A message; ``developer`` is read as ``system``."""

    role: str = Field(description="system, developer, user or assistant")
    content: str | list[TextPart] | None = Field(default=None, max_length=1_000_000)

    def text(self, i: int) -> str:
        """The message's text, or Unsupported naming what is not text."""
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            raise Unsupported(f"messages[{i}].content", "a message needs text content")
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise Unsupported(
                    f"messages[{i}].content[{j}].type", f"{part.type!r} parts are not supported"
                )
        return "".join(p.text or "" for p in self.content)


class ChatRequest(_Sampled):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = Field(default=False, description="each generated token's log-probability")
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="alternatives per token (0..20)")

    def top(self) -> int | None:
        """Alternatives per token to ask the last stage for, or None when no logprobs are wanted."""
        if not self.logprobs:
            if self.top_logprobs:
                raise Unsupported("top_logprobs", "needs logprobs: true")
            return None
        return self.top_logprobs or 0


class CompletionRequest(_Sampled):
    """``POST /v1/completions``."""

    prompt: str | list[str] = Field(description="one prompt (a list of exactly one is accepted)")
    echo: bool | None = Field(default=False, description="the prompt is repeated before the completion")
    logprobs: int | None = Field(default=None, ge=0, le=5, description="log-probabilities and alternatives")


class EmbeddingRequest(_Open):
    """``POST /v1/embeddings``."""

    model: str = Field(min_length=1, max_length=64)
    input: str | list[str] = Field(description="text or a list of texts (at most 256)")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="base64: the little-endian float32 bytes of each vector"
    )
    dimensions: int | None = Field(default=None, ge=1, description="only the model's own size is accepted")
    user: str | None = Field(default=None, max_length=256, description="an end-user id; accepted, not used")


def _refuse_extras(
    extra: dict[str, Any] | None, inert: dict[str, Callable[[Any], bool]], prefix: str
) -> None:
    for name, value in (extra or {}).items():
        check = inert.get(name)
        if check is None:
            raise Unsupported(prefix + name, "not a field this gateway knows")
        if not check(value):
            raise Unsupported(prefix + name, f"{value!r} is not supported by this gateway")


def refuse_unsupported_chat(body: ChatRequest) -> None:
    """Raise Unsupported for the first chat field or message feature the gateway would have to ignore."""
    _refuse_common(body, _INERT_CHAT)
    for i, m in enumerate(body.messages):
        if m.role not in ("system", "developer", "user", "assistant"):
            raise Unsupported(f"messages[{i}].role", f"{m.role!r} messages are not supported (no tools)")
        # name, tool_calls, audio, refusal...: none has a place in the chat template.
        _refuse_extras(m.model_extra, {"refusal": _none, "tool_calls": _empty, "function_call": _none,
                                       "audio": _none}, f"messages[{i}].")  # fmt: skip
        m.text(i)  # first: a non-text part is refused by its type, not by its fields
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            _refuse_extras(part.model_extra, {}, f"messages[{i}].content[{j}].")
    body.top()


def refuse_unsupported_completion(body: CompletionRequest) -> None:
    """Raise Unsupported for the first completions field the gateway would have to ignore."""
    _refuse_common(body, _INERT_COMPLETION)
    if body.echo and body.logprobs is not None:
        raise Unsupported("logprobs", "with echo: the prompt's log-probabilities are not supported")


def refuse_unsupported_embedding(body: EmbeddingRequest) -> None:
    """Raise Unsupported for an embeddings field the gateway does not implement."""
    _refuse_extras(body.model_extra, {}, "")


def _refuse_common(body: _Sampled, inert: dict[str, Callable[[Any], bool]]) -> None:
    _refuse_extras(body.model_extra, inert, "")
    if isinstance(body.stop, list) and len(body.stop) > 4:
        raise Unsupported("stop", f"at most 4 stop strings, got {len(body.stop)}")
    if body.stream_options is not None:
        if not body.stream:
            raise Unsupported("stream_options", "only with stream: true")
        _refuse_extras(body.stream_options.model_extra, _STREAM_OPTIONS_INERT, "stream_options.")
