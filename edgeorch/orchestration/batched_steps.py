"""Concurrent sessions' decode steps sent together: one multi-session frame per hop (batched hops).

Each session's generation (:func:`edgeorch.orchestration.generation.generate`)
hands its next decode token here instead of posting it alone. Steps bound for
the same entry stage of the same plan version (a *lane*) wait until every
session running on that lane has handed in its step, or at most ``window_s``,
and then leave as one frame (:mod:`edgeorch.transport.protocol`, "multi-session
frames"): one POST per hop for the whole batch, which every stage computes as
one forward and relays as one frame. A lone step still goes as the plain
single-session frame, so one stream pays nothing for this.

``in_flight`` batches may be on a lane at once. With more than one, the
lane's sessions split into that many groups (at most ``ceil(sessions /
in_flight)`` rows a batch) that follow each other down the chain, so one
group computes on one stage while the next computes on another (pipelining);
with one, every session rides in one batch and the stages take turns.

A row's failure is that row's only: the answer says per session what went
wrong, and each session recovers (or fails) on its own, as it would alone.
A failure of the whole hop (the entry unreachable, a malformed answer) is
every row's.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from edgeorch.transport import protocol, wire
from edgeorch.transport.hopclient import HopClient

DEFAULT_WINDOW_S = 0.005


@dataclass
class _Row:
    stream: object
    x: torch.Tensor
    meta: dict[str, Any]
    done: asyncio.Future


@dataclass
class _Lane:
    """What waits for, and what is in flight on, one entry stage of one plan version."""

    route: Any  # generation.Route (not imported: generation imports this module)
    streams: set[object] = field(default_factory=set)  # generations that sent decode steps here
    queue: list[_Row] = field(default_factory=list)
    in_flight: int = 0  # batches
    rows_in_flight: int = 0
    scheduled: bool = False
    timer: asyncio.TimerHandle | None = None
    window_over: bool = False


class StepBatcher:
    """Gathers decode steps per lane and sends each gathering as one frame (see the module docstring)."""

    def __init__(
        self, http: HopClient, max_rows: int = 16, in_flight: int = 1, window_s: float = DEFAULT_WINDOW_S
    ):
        if not 1 <= max_rows <= protocol.MAX_ROWS:
            raise ValueError(f"max_rows must be in [1, {protocol.MAX_ROWS}]")
        if in_flight < 1 or window_s < 0:
            raise ValueError("in_flight must be at least 1 and window_s not negative")
        self.http = http
        self.max_rows = max_rows
        self.in_flight = in_flight
        self.window_s = window_s
        self._lanes: dict[tuple[str, str, int], _Lane] = {}
        self._lane_of: dict[object, tuple[str, str, int]] = {}
        self.batches = 0  # frames sent (of any size)
        self.rows = 0  # steps sent in them

    async def step(self, route: Any, stream: object, x: torch.Tensor, meta: dict[str, Any]) -> wire.Frame:
        """Send one decode step of ``stream`` (one generation) with the others'; its result frame.

        Raises what a single step's POST would: HopError when the entry stage could not be
        reached, HopFailure when the chain (or this row) failed.
        """
        key = (route.entry_url, route.entry_stage, route.version)
        if (old := self._lane_of.get(stream)) != key:
            if old is not None:
                self._leave_lane(stream, old)
            self._lane_of[stream] = key
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(route)
        lane.streams.add(stream)
        row = _Row(stream, x, meta, asyncio.get_running_loop().create_future())
        lane.queue.append(row)
        self._schedule(lane)
        return await row.done

    def leave(self, stream: object) -> None:
        """``stream`` sends no more steps (its generation ended): the others stop waiting for it."""
        key = self._lane_of.pop(stream, None)
        if key is not None:
            self._leave_lane(stream, key)

    def _leave_lane(self, stream: object, key: tuple[str, str, int]) -> None:
        lane = self._lanes.get(key)
        if lane is None:
            return
        lane.streams.discard(stream)
        if not lane.streams and not lane.queue and not lane.in_flight:
            del self._lanes[key]
            if lane.timer is not None:
                lane.timer.cancel()
        else:
            self._schedule(lane)

    def _schedule(self, lane: _Lane) -> None:
        # After this loop turn: the sessions whose steps came back together hand in
        # their next ones in the same turn, and leave in one frame.
        if not lane.scheduled:
            lane.scheduled = True
            asyncio.get_running_loop().call_soon(self._flush, lane)

    def _window_over(self, lane: _Lane) -> None:
        lane.timer, lane.window_over = None, True
        self._flush(lane)

    def _flush(self, lane: _Lane) -> None:
        lane.scheduled = False
        while lane.queue and lane.in_flight < self.in_flight:
            missing = len(lane.streams) - lane.rows_in_flight - len(lane.queue)
            if missing > 0 and not lane.window_over:
                if lane.timer is None:
                    lane.timer = asyncio.get_running_loop().call_later(self.window_s, self._window_over, lane)
                return
            if lane.timer is not None:
                lane.timer.cancel()
                lane.timer = None
            lane.window_over = False
            cap = min(self.max_rows, math.ceil(len(lane.streams) / self.in_flight))
            rows, lane.queue = lane.queue[:cap], lane.queue[cap:]
            lane.in_flight += 1
            lane.rows_in_flight += len(rows)
            asyncio.get_running_loop().create_task(self._send(lane, rows))

    async def _send(self, lane: _Lane, rows: list[_Row]) -> None:
        route = lane.route
        self.batches += 1
        self.rows += len(rows)
        try:
            results = await self._post(route, rows)
        except BaseException as exc:  # noqa: BLE001 - every row hears the hop's failure
            results = [exc] * len(rows)
        finally:
            lane.in_flight -= 1
            lane.rows_in_flight -= len(rows)
            self._schedule(lane)
        for row, result in zip(rows, results, strict=True):
            if row.done.done():
                continue  # its generation went away
            if isinstance(result, BaseException):
                row.done.set_exception(result)
            else:
                row.done.set_result(result)

    async def _post(self, route: Any, rows: list[_Row]) -> list[wire.Frame | BaseException]:
        url = protocol.forward_url(route.entry_url, route.entry_stage)
        headers = route.headers(route.entry_stage, protocol.FRAME_HEADERS)
        if len(rows) == 1:  # alone: the plain single-session frame
            body = protocol.step_body({"x": rows[0].x}, **rows[0].meta)
            frame, _ = protocol.read_answer(
                await self.http.post(url, content=body, headers=headers), route.entry_stage
            )
            return [frame]
        body = protocol.rows_body(torch.cat([r.x for r in rows]), [r.meta for r in rows])
        frame, _ = protocol.read_answer(
            await self.http.post(url, content=body, headers=headers), route.entry_stage
        )
        sessions = [r.meta["session"] for r in rows]
        got = protocol.read_rows(frame, sessions, route.entry_stage)
        return [r if isinstance(r, BaseException) else wire.Frame(meta=r) for r in got]
