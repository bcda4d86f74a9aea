"""The chain protocol: what a client or a stage sends to a stage, and how it reads the answer.

A step is a POST of one wire frame to ``/v1/stages/{id}/forward``; the
answer is the chain's frame, with every hop's timings in :data:`HOPS_HEADER`.
A release is a DELETE of ``/v1/stages/{id}/sessions/{session}``. A failed
step answers JSON whose fields say what failed (:class:`HopFailure`); each
stage relays a later stage's failure with those fields unchanged, so the
caller decides from ``kind``, ``failed_stage`` and ``failed_node``, never
from the message. The sync client (:mod:`edgeorch.transport.client`), the
gateway (:mod:`edgeorch.orchestration.generation`) and the worker
(:mod:`edgeorch.runtime.host`) all use this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from edgeorch.transport import wire
from edgeorch.transport.hopclient import HopError, HopResponse, HopTimeout

HOPS_HEADER = "x-edgeorch-hops"
FRAME_HEADERS = {"content-type": wire.CONTENT_TYPE}

FailureKind = Literal[
    "unreachable",  # the failed stage's worker refused or broke the connection
    "timeout",  # it did not answer in time
    "stage_missing",  # the stage is not loaded there (released by a rollout, worker restarted)
    "session_missing",  # the session's cache is gone (expired, released)
    "position",  # the cache holds another number of tokens than the step expects
    "cache_full",  # no room for the session's KV cache
    "bad_frame",  # the body is not a valid frame
    "limit",  # the frame is larger than the stage accepts
    "bad_meta",  # the frame's metadata does not validate
    "bad_input",  # its tensors do not fit the stage
    "bad_request",  # the request itself (the stage id in the URL) is invalid
    "unauthorized",  # no or a wrong stage credential (edgeorch.security.credentials)
    "error",  # an answer without the protocol's fields (not a stage's)
]
FAILURE_KINDS: frozenset[str] = frozenset(get_args(FailureKind))
# The stage's worker is gone: re-route around its node, then replay.
NODE_LOST: frozenset[str] = frozenset({"unreachable", "timeout"})
# The chain lost a session's state but no node died: replay on the same route.
STATE_LOST: frozenset[str] = frozenset({"stage_missing", "session_missing", "position"})


@dataclass
class HopFailure(Exception):
    """A step failed: the status to answer with, a message, and which stage and node failed how.

    ``failed_node`` is None when the reporter does not know the node (a stage
    knows its next hop's URL and stage id, not its node); the gateway maps
    ``failed_stage`` to a node through its route.
    """

    status: int
    detail: str
    kind: str
    failed_stage: str | None = None
    failed_node: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.detail)

    def body(self) -> dict[str, Any]:
        """The error JSON a stage answers with."""
        return {"detail": self.detail, "kind": self.kind, "failed_stage": self.failed_stage,
                "failed_node": self.failed_node}  # fmt: skip

    def relayed(self, by: str) -> HopFailure:
        """This failure as an upstream stage answers it: same fields, a 5xx becomes 502, ``by`` prefixed."""
        status = self.status if self.status < 500 else 502
        return HopFailure(status, f"{by}: {self.detail}", self.kind, self.failed_stage, self.failed_node)


def forward_url(base_url: str, stage_id: str) -> str:
    """Where a step for ``stage_id`` is posted."""
    return f"{base_url.rstrip('/')}/v1/stages/{stage_id}/forward"


def session_url(base_url: str, stage_id: str, session: str) -> str:
    """Where ``session`` is released on ``stage_id`` (and, by relay, on every later stage)."""
    return f"{base_url.rstrip('/')}/v1/stages/{stage_id}/sessions/{session}"


def step_body(tensors: dict[str, torch.Tensor], **meta: Any) -> bytes:
    """The frame of one step: tensors plus :class:`~edgeorch.schemas.stage.ForwardMeta` fields."""
    return wire.encode_frame(wire.Frame(meta=meta, tensors=tensors))


def unreachable(exc: HopError, role: str, stage_id: str, url: str, node: str | None = None) -> HopFailure:
    """The failure of a step whose stage could not be reached (``role``: "entry stage", "next hop")."""
    if isinstance(exc, HopTimeout):
        return HopFailure(504, f"{role} {stage_id!r} at {url} timed out: {exc!r}", "timeout", stage_id, node)
    return HopFailure(
        502, f"{role} {stage_id!r} at {url} unreachable: {exc!r}", "unreachable", stage_id, node
    )


def failure_of(resp: HopResponse, stage_id: str) -> HopFailure:
    """The failure an error answer of ``stage_id`` reports; its fields when it has them."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return HopFailure(resp.status_code, resp.text[:500], "error", stage_id)
    detail = body.get("detail", resp.text[:500])
    kind = body.get("kind")
    if kind not in FAILURE_KINDS:
        return HopFailure(resp.status_code, str(detail), "error", stage_id)
    return HopFailure(resp.status_code, str(detail), kind, body.get("failed_stage"), body.get("failed_node"))


def read_answer(resp: HopResponse, stage_id: str) -> tuple[wire.Frame, list[dict]]:
    """The chain's frame and per-hop timings, or the :class:`HopFailure` the answer reports."""
    frame_bytes, hops = read_raw_answer(resp, stage_id)
    return wire.decode_frame(frame_bytes), hops


def read_raw_answer(resp: HopResponse, stage_id: str) -> tuple[bytes, list[dict]]:
    """Like :func:`read_answer`, the frame left encoded (a stage relays it unchanged)."""
    if resp.status_code != 200:
        raise failure_of(resp, stage_id)
    return resp.content, json.loads(resp.headers.get(HOPS_HEADER, "[]"))


# ----- multi-session frames (batched hops) -------------------------------------------------
#
# One frame may carry one decode token of several sessions, so a batch formed at
# the gateway or at a stage crosses each hop as one POST. Its metadata is
# ``{"rows_version": 1, "rows": [ForwardMeta, ...]}`` and its tensor "x" stacks
# the rows' inputs along dimension 0 (row i is session i's [1, 1] token or
# [1, 1, hidden] state). The answer's metadata is ``{"rows_version": 1, "rows":
# [...]}`` in the same order: a result (``session``, ``token``, ``position``) or
# ``{"session": ..., "error": HopFailure.body() + "status"}`` for a row that
# failed, so one session's failure never fails the others'. A frame whose
# metadata has no "rows" key is a single-session frame, as before.

ROWS_VERSION = 1
MAX_ROWS = 64  # schemas.stage.RowsMeta's bound


def is_rows(meta: dict[str, Any]) -> bool:
    """Whether a frame's metadata is a multi-session frame's (it has the "rows" key)."""
    return "rows" in meta or "rows_version" in meta


def rows_body(x: torch.Tensor, metas: list[dict[str, Any]]) -> bytes:
    """The frame of several sessions' decode steps: ``x`` stacks their inputs, ``metas`` their ForwardMeta."""
    if x.shape[0] != len(metas):
        raise ValueError(f"{len(metas)} rows of metadata for {x.shape[0]} rows of input")
    return wire.encode_frame(wire.Frame(meta={"rows_version": ROWS_VERSION, "rows": metas}, tensors={"x": x}))


def row_error(failure: HopFailure, session: str) -> dict[str, Any]:
    """An answer row that says ``session``'s step failed, and how."""
    return {"session": session, "error": {**failure.body(), "status": failure.status}}


def read_rows(frame: wire.Frame, sessions: list[str], stage_id: str) -> list[dict[str, Any] | HopFailure]:
    """Each row's result meta or its :class:`HopFailure`, from a multi-session answer for ``sessions``."""
    rows = frame.meta.get("rows")
    if (
        frame.meta.get("rows_version") != ROWS_VERSION
        or not isinstance(rows, list)
        or len(rows) != len(sessions)
    ):
        raise HopFailure(502, f"{stage_id!r} answered a multi-session frame without {len(sessions)} rows",
                         "error", stage_id)  # fmt: skip
    out: list[dict[str, Any] | HopFailure] = []
    for session, row in zip(sessions, rows, strict=True):
        if not isinstance(row, dict) or row.get("session") != session:
            out.append(HopFailure(502, f"{stage_id!r} answered row {row!r:.200} for session {session!r}",
                                  "error", stage_id))  # fmt: skip
        elif isinstance(err := row.get("error"), dict):
            kind = err.get("kind") if err.get("kind") in FAILURE_KINDS else "error"
            status = err.get("status") if isinstance(err.get("status"), int) else 502
            out.append(HopFailure(status, str(err.get("detail", "")), kind, err.get("failed_stage"),
                                  err.get("failed_node")))  # fmt: skip
        else:
            out.append(row)
    return out
