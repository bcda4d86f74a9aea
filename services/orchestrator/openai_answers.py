"""How the gateway writes OpenAI answers: choices, log-probabilities, embeddings, merged streams.

Pure formatting over what generation produced; the routes in
``openai_routes.py`` decide what to run.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeVar

import torch

from edgeorch.orchestration.text import TextStream
from edgeorch.runtime.logprobs import TokenLogprobs

T = TypeVar("T")


@dataclass
class ChoiceState:
    """One choice of an answer while it is generated."""

    index: int
    stream: TextStream
    finish: str = "length"
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # every emitted token's, in order
    sent_logprobs: int = 0  # how many of them a stream has already sent
    offset: int = 0  # completions: characters of text before the next token (its text_offset)

    def unsent_logprobs(self) -> list[TokenLogprobs]:
        """The log-probabilities not yet sent in a stream chunk (and marks them sent)."""
        out = self.logprobs[self.sent_logprobs :]
        self.sent_logprobs = len(self.logprobs)
        return out


@lru_cache(maxsize=1)
def _byte_level_chars() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2, SmolLM2, Qwen): one printable character per byte value."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:  # bytes with no printable form are shifted past 255, in byte order
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The exact bytes a token stands for (a byte-level token may be part of a UTF-8 character)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and "ByteLevel" in type(backend.decoder).__name__ + str(backend.decoder):
        piece = tokenizer.convert_ids_to_tokens(token_id)
        chars = _byte_level_chars()
        if isinstance(piece, str) and all(c in chars for c in piece):
            return bytes(chars[c] for c in piece)
    return tokenizer.decode([token_id]).encode("utf-8")


def _token_entry(tokenizer: Any, token_id: int, logprob: float) -> dict:
    raw = token_bytes(tokenizer, token_id)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(tokenizer: Any, items: list[TokenLogprobs]) -> dict:
    """The ``logprobs`` object of a chat choice (or chunk)."""
    content = [
        {
            **_token_entry(tokenizer, t.token, t.logprob),
            "top_logprobs": [_token_entry(tokenizer, i, lp) for i, lp in t.top],
        }  # fmt: skip
        for t in items
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer: Any, items: list[TokenLogprobs], offset: int) -> dict:
    """The legacy ``logprobs`` object of a completions choice; ``offset``: characters before the first token."""
    tokens, offsets = [], []
    for t in items:
        text = token_bytes(tokenizer, t.token).decode("utf-8", errors="replace")
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    top = [
        {token_bytes(tokenizer, i).decode("utf-8", errors="replace"): lp for i, lp in t.top} for t in items
    ]
    return {"tokens": tokens, "token_logprobs": [t.logprob for t in items], "top_logprobs": top,
            "text_offset": offsets}  # fmt: skip


def embedding_value(row: torch.Tensor, encoding_format: str) -> list[float] | str:
    """One embedding as the API writes it: a list of floats, or base64 of little-endian float32."""
    if encoding_format == "base64":
        # Every host this runs on is little-endian (edgeorch.wire refuses others).
        return base64.b64encode(row.to(torch.float32).contiguous().numpy().tobytes()).decode("ascii")
    return row.tolist()


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """The ``usage`` object: the prompt counted once, every choice's tokens summed."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """Items of several async iterators as they come; the first error ends the merge and is raised."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(it: AsyncIterator[T]) -> None:
        try:
            async for item in it:
                await queue.put((item, None))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put((None, exc))
        finally:
            await queue.put((done, None))

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is done:
                remaining -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
