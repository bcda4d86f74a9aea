"""The controller's confirmation of a predicted gain: a second look later, or the plan's own slowed steps."""

from __future__ import annotations

import asyncio
import time

from edgeorch.orchestration.generation import Route
from edgeorch.schemas.orchestrator import QosPolicy
from services.orchestrator.app import OrchestratorSettings
from services.orchestrator.controller import Controller
from services.orchestrator.live import Live


def _controller(**settings) -> tuple[Controller, Live]:
    # _confirmation and _slowed read only the settings and the deployment's live state: no store, no services.
    ctl = Controller(store=None, plane=None, settings=OrchestratorSettings(**settings), metrics=None)
    live = Live(name="d", model="m", policy=QosPolicy(), profile=None)
    live.route = Route("d", 3, ())
    ctl.live["d"] = live
    return ctl, live


def _steps(ctl: Controller, version: int, seconds: float, n: int, ago_s: float) -> None:
    """``n`` decode steps reported ``ago_s`` seconds ago (as if the gateway had just seen them)."""
    ctl.routes.step_seen("d", version, seconds)
    live = ctl.live["d"]
    t, v, s, load = live.steps.pop()
    live.steps.extend([(t - ago_s, v, s, load)] * n)


def test_a_gain_on_unchanged_steps_waits_for_a_second_look() -> None:
    async def run() -> None:
        ctl, live = _controller(confirm_s=0.2)
        _steps(ctl, 3, 0.100, 30, ago_s=3.0)
        _steps(ctl, 3, 0.110, 6, ago_s=0.5)  # 1.1x: host noise, not a change
        assert ctl._confirmation(live, ctl._slowed(live)) is None and live.pending is not None
        await asyncio.sleep(0.25)
        assert "predicted again" in ctl._confirmation(live, ctl._slowed(live))
        assert live.pending is None

    asyncio.run(run())


def test_a_plan_whose_steps_slowed_down_confirms_at_once() -> None:
    async def run() -> None:
        ctl, live = _controller(confirm_s=30.0)
        _steps(ctl, 3, 0.100, 30, ago_s=3.0)
        _steps(ctl, 2, 0.400, 10, ago_s=0.5)  # the previous version's stragglers do not count
        assert ctl._confirmation(live, ctl._slowed(live)) is None
        _steps(ctl, 3, 0.260, 6, ago_s=0.5)
        assert (
            ctl._confirmation(live, ctl._slowed(live))
            == "confirmed by measurement: decode steps 2.60x their earlier median"
        )
        assert live.pending is None
        # Switched off, the same steps wait for the second look.
        off, live_off = _controller(confirm_s=30.0, confirm_slowdown=0)
        live_off.steps.extend(live.steps)
        assert off._confirmation(live_off, off._slowed(live_off)) is None

    asyncio.run(run())


def test_steps_reported_by_the_gateway_carry_when_they_ended() -> None:
    ctl, live = _controller()
    before = time.monotonic()
    ctl.routes.step_seen("d", 3, 0.1)
    ctl.routes.step_seen("nobody", 3, 0.1)  # an unknown deployment is ignored
    ((ended_at, version, seconds, load),) = live.steps
    assert before <= ended_at <= time.monotonic() and (version, seconds, load) == (3, 0.1, 1)
    ctl.routes.observe("d", failed=False)
    assert (live.requests, live.failed) == (1, 0)


def test_news_on_a_slowed_plan_ends_the_pause_between_looks() -> None:
    async def timed_pause(ctl: Controller, live: Live, poke_after_s: float) -> float:
        loop = asyncio.get_running_loop()
        loop.call_later(poke_after_s, ctl.poke, "d", "monitor: link_changed n2")
        t0 = time.monotonic()
        await ctl._pause(live)
        return time.monotonic() - t0

    async def run() -> None:
        # A 2 s interval and a poke after 0.2 s: "at once" (< 1 s) and "the whole interval"
        # (>= 2 s, a lower bound no load can break) stay apart on two busy cores.
        ctl, live = _controller(min_eval_interval_s=2.0)
        _steps(ctl, 3, 0.100, 30, ago_s=3.0)
        _steps(ctl, 3, 0.110, 6, ago_s=0.5)
        # Steps as before: the pause lasts its interval, news or not.
        assert await timed_pause(ctl, live, 0.1) >= 2.0
        live.triggers.clear()
        _steps(ctl, 3, 0.300, 8, ago_s=0.3)
        # The plan slowed down: a trigger ends the pause at once, but nothing else does.
        assert await timed_pause(ctl, live, 0.2) < 1.0
        live.triggers.clear()
        assert await timed_pause(ctl, live, 5.0) >= 2.0

    asyncio.run(run())
