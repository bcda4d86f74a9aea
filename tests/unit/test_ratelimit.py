"""The gateway's token buckets, on a clock the test moves."""

from __future__ import annotations

import pytest

from edgeorch.security.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_goes_then_the_rate_holds_and_says_when_to_retry() -> None:
    clock = Clock()
    limiter = RateLimiter(rate_per_s=2.0, burst=3, clock=clock)
    assert [limiter.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("k") == pytest.approx(0.5)  # one token refills in 1/rate seconds
    clock.now += 0.25
    assert limiter.take("k") == pytest.approx(0.25)
    clock.now += 0.25
    assert limiter.take("k") == 0.0
    assert limiter.take("k") > 0


def test_each_key_has_its_own_bucket_and_a_bucket_never_holds_more_than_the_burst() -> None:
    clock = Clock()
    limiter = RateLimiter(rate_per_s=1.0, burst=2, clock=clock)
    assert limiter.take("a") == limiter.take("a") == 0.0 and limiter.take("a") > 0
    assert limiter.take("b") == 0.0
    clock.now += 1000  # idle for long: still only `burst` requests at once
    assert [limiter.take("a") == 0.0 for _ in range(3)] == [True, True, False]


def test_memory_stays_bounded_and_full_buckets_are_forgotten_first() -> None:
    clock = Clock()
    limiter = RateLimiter(rate_per_s=1.0, burst=1, clock=clock, max_keys=3)
    for k in ("a", "b", "c"):
        limiter.take(k)
    clock.now += 10  # every bucket has refilled
    limiter.take("busy")
    limiter.take("d")
    assert len(limiter._buckets) <= 3
    assert limiter.take("busy") > 0  # the busy bucket was kept


@pytest.mark.parametrize("rate, burst", [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_a_meaningless_limit_is_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate, burst)
