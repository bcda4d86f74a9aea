"""Log-probabilities of a sampled token, computed where the logits are: on the last stage.

A generate step asked for them (``ForwardMeta.logprobs``) returns, besides the
sampled token in its metadata, three small tensors in its result frame: the
token's log-probability and the ``top`` likeliest token ids with theirs, all
from the log-softmax of the model's logits at that position (before
temperature and top-p, as OpenAI and vLLM report them). So 12 bytes per
alternative travel back along the chain, never the logits.

The gateway reads them with :func:`read_logprobs`, which checks the frame
against what was asked (format version, names, dtypes, shapes, finite
values that are log-probabilities, ids in the vocabulary) before any number
reaches a client.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from edgeorch import wire

# Bumped when the tensors below change meaning; the gateway refuses other versions.
LOGPROBS_FORMAT = 1
TOKEN_LOGPROB = "token_logprob"
TOP_IDS = "top_ids"
TOP_LOGPROBS = "top_logprobs"


class LogprobsError(ValueError):
    """A result frame's log-probabilities are missing or inconsistent with the request."""


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token's log-probability and its likeliest alternatives (most likely first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def logprob_tensors(logits: torch.Tensor, token: int, top: int) -> dict[str, torch.Tensor]:
    """The result tensors for ``token`` sampled from the last position of ``logits``."""
    row = torch.log_softmax(logits.reshape(-1, logits.shape[-1])[-1].float(), dim=-1)
    values, ids = torch.topk(row, min(top, row.shape[0]))
    return {
        TOKEN_LOGPROB: row[token].reshape(1).clone(),
        TOP_IDS: ids.to(torch.int64),
        TOP_LOGPROBS: values.contiguous(),
    }


def read_logprobs(frame: wire.Frame, top: int, vocab_size: int | None = None) -> TokenLogprobs:
    """The log-probabilities a last stage returned for its sampled token, validated."""
    version = frame.meta.get("logprobs_format")
    if version != LOGPROBS_FORMAT:
        raise LogprobsError(
            f"result frame has logprobs_format {version!r}; this gateway reads {LOGPROBS_FORMAT}"
        )
    token = frame.meta.get("token")
    if not isinstance(token, int) or isinstance(token, bool):
        raise LogprobsError("result frame carries no integer 'token'")
    want = {TOKEN_LOGPROB: (torch.float32, (1,)), TOP_IDS: (torch.int64, (top,)),
            TOP_LOGPROBS: (torch.float32, (top,))}  # fmt: skip
    for name, (dtype, shape) in want.items():
        t = frame.tensors.get(name)
        if t is None or t.dtype != dtype or tuple(t.shape) != shape:
            got = "none" if t is None else f"{wire.dtype_name(t.dtype)} {list(t.shape)}"
            raise LogprobsError(
                f"result tensor {name!r} must be {wire.dtype_name(dtype)} {list(shape)}, got {got}"
            )
    values = [float(frame.tensors[TOKEN_LOGPROB][0]), *frame.tensors[TOP_LOGPROBS].tolist()]
    if not all(math.isfinite(v) or v == -math.inf for v in values) or any(v > 1e-4 for v in values):
        raise LogprobsError("result log-probabilities must be finite numbers <= 0")
    ids = frame.tensors[TOP_IDS].tolist()
    if any(i < 0 or (vocab_size is not None and i >= vocab_size) for i in ids):
        raise LogprobsError("result top_ids must be token ids in the vocabulary")
    # JSON has no -inf: OpenAI reports an impossible token as -9999.0, and so do we.
    clean = [min(max(v, -9999.0), 0.0) for v in values]
    return TokenLogprobs(token, clean[0], tuple(zip(ids, clean[1:], strict=True)))
