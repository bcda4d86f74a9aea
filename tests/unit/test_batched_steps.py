"""The gateway's step batcher: which steps leave together, and whose failure is whose.

The HTTP side is a recorder that answers like a chain would (each row's token is
its position); the real stages are in tests/integration/test_batched_hops.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from edgeorch.orchestration.batched_steps import StepBatcher
from edgeorch.transport import protocol, wire
from edgeorch.transport.hopclient import HopError, HopResponse
from edgeorch.transport.protocol import HopFailure


class _Route:
    entry_url, entry_stage, version = "http://127.0.0.1:1", "s0", 1

    def headers(self, stage_id: str, base: dict | None = None) -> dict:
        return dict(base or {})


class _Chain:
    """Answers every frame after ``delay_s``: each row's token is its position; session "bad" fails."""

    def __init__(self, delay_s: float = 0.01):
        self.delay_s = delay_s
        self.frames: list[list[str]] = []  # the sessions of each frame posted

    async def post(self, url: str, content: bytes, headers: dict | None = None) -> HopResponse:
        frame = wire.decode_frame(content)
        rows = frame.meta["rows"] if protocol.is_rows(frame.meta) else [frame.meta]
        self.frames.append([r["session"] for r in rows])
        await asyncio.sleep(self.delay_s)
        bad = HopFailure(409, "at another position", "position", "s0", "n0")
        out = [protocol.row_error(bad, r["session"]) if r["session"] == "bad"
               else {"session": r["session"], "token": r["position"], "position": r["position"] + 1}
               for r in rows]  # fmt: skip
        meta = {"rows_version": 1, "rows": out} if protocol.is_rows(frame.meta) else out[0]
        if "error" in meta:
            return HopResponse(409, {}, json.dumps(meta["error"]).encode())
        return HopResponse(200, {}, wire.encode_frame(wire.Frame(meta=meta)))


async def _steps(batcher: StepBatcher, sessions: list[str], rounds: int) -> dict[str, list]:
    got: dict[str, list] = {s: [] for s in sessions}

    async def run(session: str) -> None:
        stream = object()
        try:
            for position in range(1, rounds + 1):
                try:
                    frame = await batcher.step(_Route(), stream, torch.tensor([[7]]), {"session": session,
                                                                                       "position": position})  # fmt: skip
                    got[session].append(frame.meta["token"])
                except HopFailure as failure:
                    got[session].append(failure.kind)
                    return
        finally:
            batcher.leave(stream)

    await asyncio.gather(*(run(s) for s in sessions))
    return got


def test_concurrent_sessions_leave_in_one_frame_and_get_their_own_rows() -> None:
    chain = _Chain()
    got = asyncio.run(_steps(StepBatcher(chain, max_rows=16), ["a", "b", "c", "d"], 3))
    assert got == {s: [1, 2, 3] for s in "abcd"}
    assert chain.frames == [["a", "b", "c", "d"]] * 3


def test_two_batches_in_flight_split_the_sessions_into_groups() -> None:
    chain = _Chain()
    got = asyncio.run(_steps(StepBatcher(chain, max_rows=16, in_flight=2), ["a", "b", "c", "d"], 3))
    assert got == {s: [1, 2, 3] for s in "abcd"}
    # Groups of ceil(4 / 2); once a group has left, the rest may go one by one.
    assert max(len(f) for f in chain.frames) == 2 and chain.frames[:2] == [["a", "b"], ["c", "d"]], (
        chain.frames
    )


def test_max_rows_bounds_a_frame() -> None:
    chain = _Chain()
    asyncio.run(_steps(StepBatcher(chain, max_rows=3), list("abcdefg"), 1))
    assert sorted(len(f) for f in chain.frames) == [1, 3, 3]


def test_a_failed_row_fails_only_its_session() -> None:
    chain = _Chain()
    got = asyncio.run(_steps(StepBatcher(chain), ["a", "bad", "c"], 2))
    assert got == {"a": [1, 2], "bad": ["position"], "c": [1, 2]}
    assert chain.frames[0] == ["a", "bad", "c"] and chain.frames[1] == ["a", "c"]


def test_a_lone_step_goes_as_a_single_session_frame() -> None:
    chain = _Chain()
    got = asyncio.run(_steps(StepBatcher(chain), ["solo"], 2))
    assert got == {"solo": [1, 2]} and chain.frames == [["solo"], ["solo"]]


def test_a_stream_that_stops_sending_holds_the_others_one_window_at_most() -> None:
    async def go() -> tuple[float, list]:
        chain = _Chain(delay_s=0.0)
        batcher = StepBatcher(chain, window_s=0.05)
        idle = object()
        await batcher.step(_Route(), idle, torch.tensor([[7]]), {"session": "idle", "position": 1})
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await batcher.step(_Route(), object(), torch.tensor([[7]]), {"session": "x", "position": 1})
        return loop.time() - t0, chain.frames

    waited, frames = asyncio.run(go())
    assert 0.04 <= waited < 1.0 and frames == [["idle"], ["x"]]


def test_a_hop_failure_is_every_rows() -> None:
    class Down(_Chain):
        async def post(self, url, content, headers=None):
            raise HopError("connection refused")

    async def go() -> list:
        batcher = StepBatcher(Down())
        return await asyncio.gather(
            *(
                batcher.step(_Route(), object(), torch.tensor([[7]]), {"session": s, "position": 1})
                for s in "ab"
            ),
            return_exceptions=True,
        )

    assert all(isinstance(r, HopError) for r in asyncio.run(go()))


def test_read_rows_refuses_an_answer_with_other_rows() -> None:
    frame = wire.Frame(meta={"rows_version": 1, "rows": [{"session": "a", "token": 1, "position": 2}]})
    with pytest.raises(HopFailure):
        protocol.read_rows(frame, ["a", "b"], "s0")
    [mismatch] = protocol.read_rows(frame, ["z"], "s0")
    assert isinstance(mismatch, HopFailure) and mismatch.status == 502
