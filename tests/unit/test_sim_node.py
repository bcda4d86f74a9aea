"""A simulated node's stop (edgeorch/sim/node.py) when a task swallows its cancel.

Python 3.11's ``asyncio.wait_for`` can swallow a cancel that lands as its
inner request completes; the heartbeat loop then went on beating, a removed
node stayed alive to the monitor, and the fleet's stop never returned (seen
at 1,000 simulated nodes). ``stop`` cancels again until every task is done.
"""

from __future__ import annotations

import asyncio

from edgeorch.sim.fleet import make_specs
from edgeorch.sim.node import SimConfig, SimNode


def _node() -> SimNode:
    cfg = SimConfig("http://127.0.0.1:9", "http://127.0.0.1:9", "secret")
    return SimNode(make_specs(1)[0], cfg, "http://127.0.0.1:9/n/x", lambda a, b: None, [])


def test_stop_returns_when_a_task_swallows_the_first_cancel() -> None:
    swallowed = []

    async def stubborn() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            swallowed.append(True)  # what a wait_for racing its inner request did
        await asyncio.sleep(60)

    async def main() -> bool:
        node = _node()
        node._tasks = [asyncio.create_task(stubborn()), asyncio.create_task(asyncio.sleep(60))]
        await asyncio.sleep(0)
        tasks = list(node._tasks)
        await asyncio.wait_for(node.stop(), 5.0)
        return all(t.done() for t in tasks) and not node.running

    assert asyncio.run(main()) and swallowed == [True]
