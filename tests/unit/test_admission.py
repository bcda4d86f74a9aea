"""The gateway's admission: session slots and a bounded queue."""

from __future__ import annotations

import asyncio
import gc

import pytest

from edgeorch.orchestration.admission import Admission, QueueFull


def test_past_the_slots_and_the_queue_a_request_is_refused_with_a_retry_hint() -> None:
    a = Admission(max_active=2, max_waiting=1, retry_after_s=2.0)
    a.admit(2)
    a.admit(1)
    with pytest.raises(QueueFull) as info:
        a.admit(1)
    assert info.value.retry_after_s == 2.0
    a.finished(1)
    a.admit(1)  # room again
    with pytest.raises(QueueFull):
        Admission(2, 1).admit(4)  # n choices are counted together


def test_no_more_than_max_active_sessions_run_and_the_rest_wait_their_turn() -> None:
    async def scenario() -> tuple[int, list[int]]:
        a = Admission(max_active=2, max_waiting=8)
        peak, order, running = 0, [], 0

        async def session(i: int) -> None:
            nonlocal peak, running
            async with a.slot():
                running += 1
                peak = max(peak, running)
                order.append(i)
                await asyncio.sleep(0.01)
                running -= 1

        await asyncio.gather(*(session(i) for i in range(6)))
        return peak, order

    peak, order = asyncio.run(scenario())
    assert peak == 2
    assert order == list(range(6))  # arrival order


def test_a_held_stream_gives_its_sessions_back_once_when_it_ends_or_is_dropped_unstarted() -> None:
    async def events():
        yield "a"
        yield "b"

    a = Admission(max_active=4, max_waiting=4)
    a.admit(3)  # another request's reservation, which must stay
    a.admit(2)
    dropped = a.held_stream(2, events())
    del dropped  # a client gone before the body started: never iterated
    gc.collect()
    assert a.admitted == 3

    a.admit(2)

    async def drain() -> list[str]:
        return [e async for e in a.held_stream(2, events())]

    assert asyncio.run(drain()) == ["a", "b"]
    gc.collect()
    assert a.admitted == 3  # given back once, not twice
