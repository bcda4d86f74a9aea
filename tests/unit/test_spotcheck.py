"""Spot checks: how answers are compared, how steps are sampled, and the emulated tampering."""

from __future__ import annotations

import asyncio
import time

import torch

from edgeorch.orchestration.spotcheck import Answer, SpotChecker, compare
from edgeorch.runtime.emulation import perturbed
from edgeorch.schemas.rollout import PlacedStage


def _answer(token: int = 7, shift: float = 0.0) -> Answer:
    lp = torch.tensor([-0.5, -0.5, -1.25, -2.0], dtype=torch.float32)
    lp[0] += shift
    return Answer(token, lp[:1].clone(), torch.tensor([7, 3, 9], dtype=torch.int64), lp[1:].clone())


def test_fp32_answers_must_be_equal_bit_for_bit() -> None:
    assert compare(_answer(), _answer(), 0.0) == (True, 0.0, "bit-exact")
    one_ulp = float(torch.nextafter(torch.tensor(-0.5), torch.tensor(0.0))) + 0.5
    ok, diff, detail = compare(_answer(shift=one_ulp), _answer(), 0.0)
    assert not ok and 0 < diff < 1e-6 and "bit-exact" in detail


def test_lossy_answers_are_compared_within_the_tolerance() -> None:
    assert compare(_answer(shift=0.01), _answer(), 0.05)[0]
    ok, diff, _ = compare(_answer(shift=0.2), _answer(), 0.05)
    assert not ok and abs(diff - 0.2) < 1e-6


def test_another_token_or_other_top_tokens_fail_whatever_the_tolerance() -> None:
    assert not compare(_answer(token=8), _answer(), 10.0)[0]
    other = _answer()
    other.top_ids = torch.tensor([7, 9, 3])
    assert not compare(other, _answer(), 10.0)[0]


class _Shadows:
    """Which nodes are untrusted; never a shadow (the checks this test starts end as skipped)."""

    def __init__(self, untrusted: set[str]):
        self._untrusted = untrusted

    def untrusted(self, node: str) -> bool:
        return node in self._untrusted

    async def refresh(self, model: str) -> None:
        pass

    async def get(self, *args) -> None:
        return None


def _stages(*nodes: str) -> tuple[PlacedStage, ...]:
    return tuple(PlacedStage(node=n, start=i, end=i + 1, stage_id=f"d.v1.s{i}", url=f"http://{n}:1", model="m",
                             next=None) for i, n in enumerate(nodes))  # fmt: skip


def test_a_share_of_the_steps_of_routes_with_untrusted_nodes_is_sampled() -> None:
    async def run() -> tuple[dict, dict]:
        checker = SpotChecker(None, _Shadows({"u"}), None, share=0.02, max_in_flight=10_000, seed=18)
        for _ in range(20_000):
            checker.after_step("d", 1, _stages("t", "u"), {}, [1, 2, 3])
        trusted_only = SpotChecker(None, _Shadows({"u"}), None, share=1.0, seed=18)
        for _ in range(100):
            trusted_only.after_step("d", 1, _stages("t", "t2"), {}, [1, 2, 3])
        await asyncio.sleep(0.05)
        return checker.counts, trusted_only.counts

    counts, trusted_only = asyncio.run(run())
    assert 330 <= counts["sampled"] <= 470, counts  # 400 expected; ±5 standard deviations
    assert counts["checked"] == 0 and counts["skipped"] == counts["sampled"]  # no shadow: nothing compared
    assert trusted_only["sampled"] == 0


def test_the_emulated_tampering_adds_noise_of_the_asked_size() -> None:
    h = torch.randn(4, 3, 576)
    rms = h.pow(2).mean().sqrt()
    out = perturbed(h, 0.1, torch.Generator().manual_seed(0))
    assert out.shape == h.shape and out.dtype == h.dtype
    noise_rms = (out - h).pow(2).mean().sqrt()
    assert abs(float(noise_rms / rms) - 0.1) < 0.01


def test_a_whole_answer_waits_for_a_later_pass_and_forces_a_check_when_none_comes() -> None:
    from edgeorch.orchestration.spotcheck import Verdict

    async def run() -> tuple[dict, float, dict]:
        checker = SpotChecker(None, _Shadows({"u"}), None, share=0.02, settle_max_s=0.2)
        since = time.monotonic()
        t0 = time.perf_counter()
        await checker.settle("d", 1, _stages("t", "u"), {}, [1, 2], since)  # nothing comes: a forced check
        forced_wait = time.perf_counter() - t0
        counts_forced = dict(checker.counts)

        async def later_pass() -> None:
            await asyncio.sleep(0.05)
            await checker._record(Verdict(True, "d", 1, ("u",), 2, "bit-exact", 0.01, 0.0, time.monotonic()))

        checker.counts = {k: 0 for k in checker.counts}
        since = time.monotonic()
        task = asyncio.create_task(later_pass())
        await checker.settle("d", 1, _stages("t", "u"), {}, [1, 2], since)
        await task
        return counts_forced, forced_wait, dict(checker.counts)

    forced, waited, passed = asyncio.run(run())
    assert forced["forced"] == 1 and waited >= 0.2
    assert passed.get("forced", 0) == 0 and passed["passed"] == 1
