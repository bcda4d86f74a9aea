"""Validate a forward frame against the stage it is sent to, before any compute.

Everything here answers "does this input fit this stage?"; a failure is the
sender's fault and becomes a 422, never a crash inside torch.
"""

from __future__ import annotations

import torch

from edgeorch.engine.stage import LoadedStage
from edgeorch.models.adapter import StageInput
from edgeorch.schemas.stage import ForwardMeta
from edgeorch.transport import wire

MAX_ENCODER_BATCH = 64


class InputMismatch(ValueError):
    """The frame is valid but does not fit the stage."""


def _max_positions(stage: LoadedStage) -> int | None:
    cfg = stage.adapter.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def _check_tokens(stage: LoadedStage, x: torch.Tensor) -> torch.Tensor:
    if x.dtype not in (torch.int64, torch.int32) or x.ndim != 2:
        raise InputMismatch(f"stage starts at the embedding: expected int64 token ids [batch, tokens], got "
                            f"{wire.dtype_name(x.dtype)} {list(x.shape)}")  # fmt: skip
    vocab = stage.adapter.config.vocab_size
    if x.numel():
        lo, hi = torch.aminmax(x)  # one reduction, not two: this runs on every decode step
        if int(lo) < 0 or int(hi) >= vocab:
            raise InputMismatch(f"token ids must be in [0, {vocab})")
    return x.to(torch.int64)


def _check_hidden(stage: LoadedStage, x: torch.Tensor) -> torch.Tensor:
    hidden = stage.adapter.hidden_size
    if x.dtype != torch.float32 or x.ndim != 3 or x.shape[2] != hidden:
        raise InputMismatch(f"stage starts at unit {stage.start}: expected float32 hidden states "
                            f"[batch, tokens, {hidden}], got {wire.dtype_name(x.dtype)} {list(x.shape)}")  # fmt: skip
    if not bool(torch.isfinite(x).all()):
        raise InputMismatch("hidden states contain NaN or infinity")
    return x


def _check_mask(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype not in (torch.int64, torch.int32, torch.bool) or list(mask.shape) != list(x.shape[:2]):
        raise InputMismatch(f"attention_mask must be integer or bool [batch, tokens] = {list(x.shape[:2])}")
    if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) > 1):
        raise InputMismatch("attention_mask values must be 0 or 1")
    return mask.to(torch.int64)


def check_input(stage: LoadedStage, meta: ForwardMeta, frame: wire.Frame) -> StageInput:
    """The stage input carried by ``frame``, or InputMismatch saying what is wrong."""
    unknown = set(frame.tensors) - {"x", "attention_mask"}
    if unknown or "x" not in frame.tensors:
        raise InputMismatch(
            f"a forward frame carries tensor 'x' and optionally 'attention_mask'; got {sorted(frame.tensors)}"
        )
    decoder = stage.adapter.is_decoder
    if decoder and meta.mode == "encode":
        raise InputMismatch("mode 'encode' is for encoder models; this stage is a decoder")
    if not decoder and meta.mode != "encode":
        raise InputMismatch(f"mode {meta.mode!r} is for decoder models; this stage is an encoder")
    x = frame.tensors["x"]
    x = _check_tokens(stage, x) if stage.first else _check_hidden(stage, x)
    batch, tokens = x.shape[0], x.shape[1]
    if batch < 1 or tokens < 1:
        raise InputMismatch(f"empty input {list(x.shape)}: a step needs at least one token")
    if decoder and batch != 1:
        raise InputMismatch(f"decoder steps carry one sequence per session; got batch {batch}")
    if not decoder and batch > MAX_ENCODER_BATCH:
        raise InputMismatch(f"encoder batch {batch} exceeds {MAX_ENCODER_BATCH}")
    limit = _max_positions(stage)
    if limit is not None and meta.position + tokens > limit:
        raise InputMismatch(f"positions {meta.position}..{meta.position + tokens} exceed the model's {limit}")
    mask = _check_mask(frame.tensors.get("attention_mask"), x)
    return StageInput(x=x, position=meta.position, attention_mask=mask, logits=meta.logits)
