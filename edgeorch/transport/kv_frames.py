"""KV migration on the wire: a session's keys and values for some units, and the pull request.

A KV slice travels as an ordinary wire frame (:mod:`edgeorch.transport.wire`:
JSON header, raw tensor bytes, nothing unpickled) with one tensor ``kv``
``[units, 2, batch, tokens, kv_heads, head_dim]`` (keys then values, token
major: the lean cache's own layout) and a versioned ``kv`` header saying which
units and positions it holds. A receiver checks the header against the
tensor's shape and against what it asked for before it touches a cache.

A pull (``POST /v1/stages/{id}/sessions/{session}/kv/pull``) asks the stage
that will hold a session to fetch the KV of its units from the stages that
hold them now (the previous plan's), up to ``position``; a source on the same
worker is copied in memory, a remote one is fetched from
``GET /v1/stages/{id}/sessions/{session}/kv`` (the export).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field

from edgeorch.schemas.stage import ID_PATTERN
from edgeorch.security.credentials import CREDENTIAL_PATTERN
from edgeorch.transport import wire

KV_VERSION = 1
KV_TENSOR = "kv"
MAX_SOURCES = 64


class KVFrameError(ValueError):
    """A KV frame is not what was asked for (version, units, positions or shape)."""


class KVSource(BaseModel):
    """A stage of the previous plan that holds some of the session's units."""

    stage_id: str = Field(pattern=ID_PATTERN)
    url: str = Field(min_length=1, max_length=2048, description="the worker holding it")
    start: int = Field(ge=0, description="its first unit")
    end: int = Field(gt=0, description="one past its last unit")
    credential: str | None = Field(
        default=None, pattern=CREDENTIAL_PATTERN, repr=False,
        description="its data-plane credential, sent on the KV read; null: an open stage",
    )  # fmt: skip


class KVPull(BaseModel):
    """Build a session's cache on a stage from the previous plan's stages."""

    position: int = Field(gt=0, description="tokens the session's caches hold (all of them move)")
    sources: list[KVSource] = Field(max_length=MAX_SOURCES)


class KVPullReport(BaseModel):
    """What a pull moved: bytes fetched over the network, bytes copied on this worker."""

    stage_id: str
    session: str
    position: int
    units: list[int] = Field(description="[first, end) of the layer units filled")
    bytes_remote: int
    bytes_local: int
    seconds: float


@dataclass(frozen=True)
class KVSlice:
    """Keys and values of layer units ``[unit_start, unit_end)`` at positions ``[start, end)``."""

    unit_start: int
    unit_end: int
    start: int
    end: int
    kv: torch.Tensor  # [units, 2, batch, tokens, kv_heads, head_dim]


def kv_url(base_url: str, stage_id: str, session: str) -> str:
    """Where a session's KV on a stage is exported."""
    return f"{base_url.rstrip('/')}/v1/stages/{stage_id}/sessions/{session}/kv"


def pull_url(base_url: str, stage_id: str, session: str) -> str:
    """Where a stage is asked to pull a session's KV."""
    return kv_url(base_url, stage_id, session) + "/pull"


def encode_slice(piece: KVSlice) -> bytes:
    """A KV slice as a wire frame."""
    meta = {"kv": {"version": KV_VERSION, "units": [piece.unit_start, piece.unit_end],
                   "positions": [piece.start, piece.end]}}  # fmt: skip
    return wire.encode_frame(wire.Frame(meta=meta, tensors={KV_TENSOR: piece.kv}))


def decode_slice(data: bytes, units: tuple[int, int], positions: tuple[int, int], max_bytes: int) -> KVSlice:
    """Parse a KV frame and check it holds exactly ``units`` at ``positions``; KVFrameError otherwise."""
    frame = wire.decode_frame(data, max_bytes)
    head = frame.meta.get("kv")
    if not isinstance(head, dict) or head.get("version") != KV_VERSION:
        raise KVFrameError(f"not a version-{KV_VERSION} KV frame (header {str(head)[:200]})")
    if head.get("units") != list(units) or head.get("positions") != list(positions):
        raise KVFrameError(
            f"KV frame holds units {head.get('units')} at positions {head.get('positions')}, "
            f"asked for {list(units)} at {list(positions)}"
        )
    kv = frame.tensors.get(KV_TENSOR)
    if kv is None or set(frame.tensors) != {KV_TENSOR} or kv.dim() != 6:
        raise KVFrameError("a KV frame carries exactly one 6-dimensional tensor named 'kv'")
    if kv.shape[0] != units[1] - units[0] or kv.shape[1] != 2 or kv.shape[3] != positions[1] - positions[0]:
        raise KVFrameError(f"KV tensor of shape {list(kv.shape)} does not match units {units}, {positions}")
    return KVSlice(units[0], units[1], positions[0], positions[1], kv)
