"""Tokens to text for the gateway: prompts, incremental detokenisation, stop strings.

Streamed and non-streamed answers come from the same :class:`TextStream`, so
the concatenated deltas of a stream are exactly the non-streamed text.
"""

from __future__ import annotations

from typing import Any


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The model's own chat template over the messages, ready for the assistant's turn."""
    if tokenizer.chat_template:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        return list(out["input_ids"])
    # A model without a template: the turns as plain text, one per line.
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    return list(tokenizer(text)["input_ids"])


def stop_token_ids(tokenizer: Any) -> set[int]:
    """Token ids that end a generation (the end-of-sequence token)."""
    return {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()


class TextStream:
    """Turns generated token ids into text deltas, holding back what a stop string might still start.

    Text is decoded from all tokens so far each time (a token can complete a
    multi-byte character); a delta is released only once it can no longer
    be part of a stop string or an unfinished character.
    """

    def __init__(self, tokenizer: Any, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add a token; returns the text that is now final (may be empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            cut = text.find(s, max(0, self.emitted - len(s)))
            if cut != -1:
                self.stopped = True
                text = text[:cut]
        self.text = text
        safe = len(text) if self.stopped else self._safe_len(text)
        delta = text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return delta

    def finish(self) -> str:
        """The text not yet released, at the end of the generation."""
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta

    def _safe_len(self, text: str) -> int:
        end = len(text)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character
            end = len(text.rstrip("\ufffd"))
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[:end].endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return max(self.emitted, end - hold)
