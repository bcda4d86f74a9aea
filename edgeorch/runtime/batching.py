"""Continuous batching of decode steps on a worker: concurrent sessions' tokens as one forward.

A decode step (one token of one session) reads every weight of the stage to
compute one row; on a CPU that is memory-bound, so N sessions' tokens in one
forward cost little more than one. Steps that arrive while the compute thread
is busy wait in a per-stage queue; when it frees, everything queued (up to
``max_batch``) runs as one batch through ``LoadedStage.run_rows``: the
projections and the MLP as one matmul over the batch's rows, attention per
session over that session's own cache (no padding to the longest context).
No window is waited for: a step that finds the stage idle starts at once, so
one stream pays nothing, and the batch grows by itself with the load.

A batch's steps fail one by one: a session whose cache is missing or at
another position gets its own error, the others run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edgeorch.models.adapter import StageInput
from edgeorch.schemas.stage import ForwardMeta
from edgeorch.transport import wire

if TYPE_CHECKING:
    from edgeorch.runtime.hosted import HostedStage

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 16


@dataclass
class BatchedStep:
    """What one session's step in a batch came to."""

    frame: wire.Frame
    compute_s: float  # the whole batch's compute (every row shares it)
    queue_s: float  # from arrival until its batch started
    batch: int  # rows in its batch


@dataclass
class _Waiting:
    meta: ForwardMeta
    inp: StageInput
    t_queued: float
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


# Runs a batch on the compute thread: (stage, steps) -> one result or exception per step, and seconds.
RowsCompute = Callable[["HostedStage", list[tuple[ForwardMeta, StageInput]]], tuple[list, float]]
OnThread = Callable[..., Awaitable]


def batchable(hosted: HostedStage, meta: ForwardMeta, inp: StageInput) -> bool:
    """Whether a step may join a batch: one decode token of a generating session on a batching engine."""
    return (
        meta.mode == "generate"
        and inp.x.shape[0] == 1
        and inp.x.shape[1] == 1
        and inp.attention_mask is None
        and hosted.loaded.batches_rows
    )


class DecodeBatcher:
    """Per-stage queues of decode steps, drained as batches on the compute thread."""

    def __init__(self, on_thread: OnThread, compute: RowsCompute, max_batch: int = DEFAULT_MAX_BATCH):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.on_thread = on_thread
        self.compute = compute
        self.max_batch = max_batch
        self._queues: dict[str, list[_Waiting]] = {}
        self._draining: set[str] = set()
        self.batches = 0  # batches run (of any size)
        self.rows = 0  # steps run in them
        self.largest = 0  # the largest batch so far

    def queued(self) -> int:
        """Steps waiting for a batch, on every stage."""
        return sum(len(q) for q in self._queues.values())

    async def submit(
        self, hosted: HostedStage, meta: ForwardMeta, inp: StageInput, t_queued: float
    ) -> BatchedStep:
        """Queue one decode step and wait for the batch it runs in."""
        (done,) = self.submit_many(hosted, [(meta, inp)], t_queued)
        return await done

    def submit_many(
        self, hosted: HostedStage, steps: list[tuple[ForwardMeta, StageInput]], t_queued: float
    ) -> list[asyncio.Future]:
        """Queue several decode steps at once (a multi-session frame's rows); one future per step.

        They are queued together, so they run in one batch (with whatever else waits) unless
        they are more than ``max_batch``.
        """
        waiting = [_Waiting(meta, inp, t_queued) for meta, inp in steps]
        self._queues.setdefault(hosted.stage_id, []).extend(waiting)
        if hosted.stage_id not in self._draining:
            self._draining.add(hosted.stage_id)
            asyncio.get_running_loop().create_task(self._drain(hosted))
        return [w.done for w in waiting]

    async def _drain(self, hosted: HostedStage) -> None:
        """Run the stage's queue batch after batch until it is empty."""
        queue = self._queues[hosted.stage_id]
        try:
            while queue:
                batch = queue[: self.max_batch]
                del queue[: self.max_batch]
                await self._run(hosted, batch)
        finally:
            self._draining.discard(hosted.stage_id)

    async def _run(self, hosted: HostedStage, batch: list[_Waiting]) -> None:
        t_start = time.perf_counter()
        try:
            results, compute_s = await self.on_thread(self.compute, hosted, [(w.meta, w.inp) for w in batch])
        except Exception as exc:  # noqa: BLE001 - every waiter hears the failure; the drain goes on
            log.exception("a batch of %d decode steps on %s failed", len(batch), hosted.stage_id)
            results, compute_s = [exc] * len(batch), 0.0
        self.batches += 1
        self.rows += len(batch)
        self.largest = max(self.largest, len(batch))
        for waiting, result in zip(batch, results, strict=True):
            if waiting.done.done():
                continue  # its request went away (client disconnected)
            if isinstance(result, BaseException):
                waiting.done.set_exception(result)
            else:
                queue_s = t_start - waiting.t_queued
                waiting.done.set_result(BatchedStep(result, compute_s, queue_s, len(batch)))
