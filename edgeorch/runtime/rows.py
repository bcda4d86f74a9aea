"""A multi-session frame at a stage: several sessions' decode tokens in, one hop on (batched hops).

The gateway sends concurrent sessions' next tokens as one frame
(:mod:`edgeorch.transport.protocol`, "multi-session frames"). A stage checks
each row against itself, queues the rows together on its decode batcher (so
they run as one forward, with any other steps waiting there), stacks the
outputs of the rows that ran into one frame for the next stage, and merges
the next stage's answer rows with its own failed rows, in the frame's order.

A row fails alone: a session whose cache is gone or at another position, or
whose input does not fit, gets its own error row and leaves the frame; the
others go on. Only what concerns the whole frame fails it whole: a malformed
frame (4xx before any compute) or a next hop that cannot be reached (every
row's session then re-routes, as each would alone).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import torch

from edgeorch.runtime.batching import BatchedStep
from edgeorch.runtime.checks import InputMismatch, check_input
from edgeorch.runtime.sessions import CacheFull, PositionMismatch, UnknownSession
from edgeorch.schemas.profile import profile_key
from edgeorch.schemas.stage import ForwardMeta, RowsMeta
from edgeorch.transport import compression, protocol, wire
from edgeorch.transport.protocol import HopFailure

if TYPE_CHECKING:
    from edgeorch.models.adapter import StageInput
    from edgeorch.runtime.host import StageHost
    from edgeorch.runtime.hosted import HostedStage

# What a row's own failure answers: the status and kind a single-session step would get.
_ROW_FAILURES: tuple[tuple[type[Exception], int, str], ...] = (
    (UnknownSession, 404, "session_missing"),
    (PositionMismatch, 409, "position"),
    (CacheFull, 503, "cache_full"),
    (InputMismatch, 422, "bad_input"),
)


def row_failure(exc: BaseException, stage_id: str, node: str) -> HopFailure:
    """The failure one row's exception answers, named after this stage and node."""
    if isinstance(exc, HopFailure):
        return exc
    for cls, status, kind in _ROW_FAILURES:
        if isinstance(exc, cls):
            return HopFailure(status, str(exc), kind, stage_id, node)
    return HopFailure(500, f"{type(exc).__name__}: {exc}", "error", stage_id, node)


def parse_rows(hosted: HostedStage, frame: wire.Frame) -> tuple[list[ForwardMeta], list[Any]]:
    """The rows' metadata and each row's StageInput or its own InputMismatch.

    Raises ValidationError (malformed metadata) or InputMismatch (tensors that do not
    match the rows) for what makes the whole frame unusable.
    """
    meta = RowsMeta.model_validate(frame.meta)
    if set(frame.tensors) != {"x"}:
        raise InputMismatch(f"a multi-session frame carries exactly tensor 'x'; got {sorted(frame.tensors)}")
    x = frame.tensors["x"]
    loaded = hosted.loaded
    want = "[rows, 1]" if loaded.first else f"[rows, 1, {loaded.adapter.hidden_size}] float32"
    if (
        x.ndim != (2 if loaded.first else 3)
        or x.shape[0] != len(meta.rows)
        or x.shape[1] != 1
        or (not loaded.first and (x.shape[2] != loaded.adapter.hidden_size or x.dtype != torch.float32))
    ):
        raise InputMismatch(
            f"a multi-session frame's x is {want} with {len(meta.rows)} rows; got "
            f"{wire.dtype_name(x.dtype)} {list(x.shape)}"
        )
    inputs: list[Any] = []
    for i, row in enumerate(meta.rows):
        try:
            inputs.append(check_input(hosted.loaded, row, wire.Frame(meta={}, tensors={"x": x[i : i + 1]})))
        except InputMismatch as exc:
            inputs.append(exc)
    return meta.rows, inputs


async def compute_rows(
    host: StageHost, hosted: HostedStage, steps: list[tuple[ForwardMeta, StageInput]]
) -> tuple[list, dict[str, Any]]:
    """Run the rows as one batch (inline when the worker is otherwise idle); results and the hop's timings."""
    t_queued = time.perf_counter()
    if host.may_inline_rows(len(steps)):
        host.inline_steps += 1
        results, compute_s = host.compute_rows_now(hosted, steps)
        return results, {"compute_s": compute_s, "queue_s": 0.0, "inline": True, "batch": len(steps)}
    done = host.batcher.submit_many(hosted, steps, t_queued)
    got = await asyncio.gather(*done, return_exceptions=True)
    steps_run = [g for g in got if isinstance(g, BatchedStep)]
    results = [g.frame if isinstance(g, BatchedStep) else g for g in got]
    first = steps_run[0] if steps_run else None
    hop = {"compute_s": first.compute_s if first else 0.0, "queue_s": first.queue_s if first else 0.0,
           "inline": False, "batch": max((g.batch for g in steps_run), default=0)}  # fmt: skip
    return results, hop


async def forward_rows(
    host: StageHost, hosted: HostedStage, frame: wire.Frame, t_start: float
) -> tuple[bytes, list[dict]]:
    """Run a multi-session frame here and down the chain; the answer frame and per-hop timings."""
    stage_id, node = hosted.stage_id, host.node_id
    metas, inputs = parse_rows(hosted, frame)
    answer: list[dict[str, Any] | None] = [None] * len(metas)
    steps: list[tuple[int, ForwardMeta, StageInput]] = []
    for i, (meta, inp) in enumerate(zip(metas, inputs, strict=True)):
        if isinstance(inp, Exception):
            answer[i] = protocol.row_error(row_failure(inp, stage_id, node), meta.session)
        else:
            steps.append((i, meta, inp))
    hop: dict[str, Any] = {"stage": stage_id, "node": node, "rows": len(metas), "compute_s": 0.0,
                           "queue_s": 0.0, "inline": False, "batch": 0}  # fmt: skip
    ran: list[tuple[int, wire.Frame]] = []
    if steps:
        results, timings = await compute_rows(host, hosted, [(m, inp) for _, m, inp in steps])
        hop.update(timings)
        for (i, meta, _), result in zip(steps, results, strict=True):
            if isinstance(result, wire.Frame):
                ran.append((i, result))
            else:
                answer[i] = protocol.row_error(row_failure(result, stage_id, node), meta.session)
        host.metrics.observe_compute(stage_id, hop["compute_s"], len(hosted.loaded.units))
    url = hosted.forward_url()
    model = profile_key(hosted.spec.model, hosted.spec.format)
    sample = {"stage": stage_id, "model": model, "start": hosted.loaded.start, "end": hosted.loaded.end,
              "q_len": 1, "compute_s": hop["compute_s"], "batch": hop["batch"]}  # fmt: skip
    downstream: list[dict] = []
    if url is None or not ran:
        for i, out in ran:
            answer[i] = out.meta
    else:
        downstream = await _send_on(host, hosted, url, ran, answer, hop, sample)
    hop["handler_s"] = time.perf_counter() - t_start
    if steps:
        host.notify(sample)
    meta = {"rows_version": protocol.ROWS_VERSION, "rows": answer}
    return wire.encode_frame(wire.Frame(meta=meta, tensors={})), [hop, *downstream]


async def _send_on(
    host: StageHost,
    hosted: HostedStage,
    url: str,
    ran: list[tuple[int, wire.Frame]],
    answer: list[dict[str, Any] | None],
    hop: dict[str, Any],
    sample: dict[str, Any],
) -> list[dict]:
    """Send the rows that ran here to the next stage as one frame; fill ``answer`` from its rows."""
    x = torch.cat([out.tensors["x"] for _, out in ran])
    out_meta = {"rows_version": protocol.ROWS_VERSION, "rows": [out.meta for _, out in ran]}
    tensors = {"x": x}
    if hosted.spec.activation_format != "fp32":
        tensors.update(compression.pack(x, hosted.spec.activation_format))
    payload = wire.encode_frame(wire.Frame(meta=out_meta, tensors=tensors))
    hop["bytes_out"] = len(payload)
    host.metrics.bytes_out.labels(hosted.stage_id).inc(len(payload))
    t0 = time.perf_counter()
    raw, downstream = await host.send(hosted, url, payload)
    hop["downstream_s"] = time.perf_counter() - t0
    next_id = hosted.spec.next.stage_id if hosted.spec.next else "?"
    try:
        rows = protocol.read_rows(wire.decode_frame(raw), [out.meta["session"] for _, out in ran], next_id)
    except wire.FrameError as exc:
        raise HopFailure(502, f"next hop {next_id!r} answered a bad frame: {exc}", "error", next_id) from exc
    for (i, out), row in zip(ran, rows, strict=True):
        answer[i] = protocol.row_error(row, out.meta["session"]) if isinstance(row, HopFailure) else row
    if downstream and "handler_s" in downstream[0]:
        sample.update(next_url=str(hosted.spec.next.url), bytes_out=len(payload),
                      hop_s=hop["downstream_s"] - downstream[0]["handler_s"])  # fmt: skip
    return downstream
