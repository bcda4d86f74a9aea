"""The gateway's admission: the model's context, session slots, a bounded queue."""

from __future__ import annotations

import asyncio

import pytest

from edgeorch.orchestration.admission import (
    Admission,
    ContextTooLong,
    QueueFull,
    check_context,
    context_limit,
)


def test_a_request_must_fit_the_models_context() -> None:
    check_context(100, 28, 128)
    with pytest.raises(
        ContextTooLong, match="100 tokens plus max_tokens 29 exceed the model's context of 128"
    ):
        check_context(100, 29, 128)
    check_context(10**6, 10**6, None)  # a model that names no limit


def test_the_context_limit_is_read_from_the_models_config(store) -> None:
    assert context_limit(store.path("smollm2-135m")) == 8192


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
