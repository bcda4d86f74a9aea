"""Small steps compute on the worker's event loop only when that blocks nothing, and give the same tokens."""

from __future__ import annotations

import asyncio
import threading

import torch
from prometheus_client import CollectorRegistry

from edgeorch.runtime.host import StageHost
from edgeorch.runtime.metrics import WorkerMetrics
from edgeorch.runtime.sessions import SessionStore
from edgeorch.schemas.stage import Emulation, StageSpec
from edgeorch.transport import wire

MODEL = "tiny-llama"  # 6 units: one stage holds the whole model, so no next hop is needed
LIMIT = 1 << 20


def _frame(session: str, position: int, ids: list[int]) -> bytes:
    meta = {"session": session, "position": position, "mode": "generate"}
    return wire.encode_frame(wire.Frame(meta=meta, tensors={"x": torch.tensor([ids])}))


async def _host(store, **kwargs) -> StageHost:
    host = StageHost(store, SessionStore(1 << 30, 60), WorkerMetrics(CollectorRegistry()), "n", **kwargs)
    await host.start()
    await host.load("m.s0", StageSpec(model=MODEL, start=0, end=6))
    return host


async def _generate(host: StageHost, session: str, prompt: list[int], n: int) -> tuple[list[int], list[bool]]:
    """Greedy decoding through the host; returns the tokens and, per step, whether it ran inline."""
    tokens, inline, x, position = [], [], prompt, 0
    for _ in range(n):
        answer, hops = await host.forward("m.s0", _frame(session, position, x), LIMIT)
        position += len(x)
        x = [wire.decode_frame(answer).meta["token"]]
        tokens.append(x[0])
        inline.append(hops[0]["inline"])
    return tokens, inline


def test_decode_steps_run_inline_and_give_the_compute_threads_tokens(store) -> None:
    async def scenario() -> None:
        inline_host, thread_host = await _host(store), await _host(store, inline_max_tokens=0)
        try:
            prompt = list(range(3, 15))  # 12 tokens: more than the default 8, so the prefill is offloaded
            got, where = await _generate(inline_host, "a", prompt, 6)
            ref, ref_where = await _generate(thread_host, "a", prompt, 6)
            assert got == ref
            assert where == [False, True, True, True, True, True]
            assert not any(ref_where) and thread_host.inline_steps == 0
            assert inline_host.inline_steps == 5
        finally:
            await inline_host.close()
            await thread_host.close()

    asyncio.run(scenario())


def test_a_step_goes_to_the_thread_while_anything_else_is_in_flight_or_the_node_is_slowed(store) -> None:
    async def scenario() -> None:
        host = await _host(store)
        try:
            # The compute thread is busy (a probe, say): the caches must keep one user.
            release = threading.Event()
            busy = asyncio.create_task(host.run_compute(release.wait, emulate=False))
            await asyncio.sleep(0.05)
            stepping = asyncio.create_task(host.forward("m.s0", _frame("b", 0, [5]), LIMIT))
            await asyncio.sleep(0.05)
            release.set()
            await busy
            _, hops = await stepping
            assert hops[0]["inline"] is False

            # Another forward is in flight on this worker (waiting for its next hop, say).
            host.in_flight += 1
            try:
                _, hops = await host.forward("m.s0", _frame("c", 0, [5]), LIMIT)
            finally:
                host.in_flight -= 1
            assert hops[0]["inline"] is False

            # An emulated slowdown sleeps on the compute thread, never on the loop.
            host.emulation = Emulation(slowdown=2.0)
            _, hops = await host.forward("m.s0", _frame("d", 0, [5]), LIMIT)
            assert hops[0]["inline"] is False
            host.emulation = Emulation()
            _, hops = await host.forward("m.s0", _frame("e", 0, [5]), LIMIT)
            assert hops[0]["inline"] is True
        finally:
            await host.close()

    asyncio.run(scenario())
