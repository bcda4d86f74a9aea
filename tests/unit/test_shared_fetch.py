"""Concurrent looks at the fleet share one fetch (ControlPlane.shared, issue 23)."""

from __future__ import annotations

import asyncio

import pytest

from edgeorch.orchestration.clients import ControlPlane


def _plane() -> ControlPlane:
    return ControlPlane("http://127.0.0.1:9", "http://127.0.0.1:9", "http://127.0.0.1:9")


def test_callers_while_a_fetch_is_in_flight_share_it_and_later_ones_fetch_anew() -> None:
    async def main() -> None:
        plane, calls = _plane(), []

        async def fetch() -> list[int]:
            calls.append(1)
            await asyncio.sleep(0.05)
            return [len(calls)]

        together = await asyncio.gather(*(plane.shared(("links",), fetch) for _ in range(5)))
        assert len(calls) == 1 and all(r is together[0] for r in together)
        assert await plane.shared(("links",), fetch) == [2]  # a later look fetches anew
        a, b = await asyncio.gather(
            plane.shared(("nodes", "m1"), fetch), plane.shared(("nodes", "m2"), fetch)
        )
        assert len(calls) == 4 and a is not b  # different keys are different fetches
        await plane.close()

    asyncio.run(main())


def test_an_error_reaches_every_caller_and_a_cancelled_caller_does_not_cancel_the_others() -> None:
    async def main() -> None:
        plane = _plane()

        async def failing() -> None:
            await asyncio.sleep(0.02)
            raise RuntimeError("monitor down")

        results = await asyncio.gather(
            *(plane.shared(("links",), failing) for _ in range(3)), return_exceptions=True
        )
        assert [str(r) for r in results] == ["monitor down"] * 3

        async def slow() -> str:
            await asyncio.sleep(0.05)
            return "figures"

        first = asyncio.ensure_future(plane.shared(("links",), slow))
        second = asyncio.ensure_future(plane.shared(("links",), slow))
        await asyncio.sleep(0.01)
        first.cancel()
        assert await second == "figures"
        with pytest.raises(asyncio.CancelledError):
            await first
        assert plane._inflight == {}
        await plane.close()

    asyncio.run(main())
