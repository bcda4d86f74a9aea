"""Token buckets per caller: the gateway's rate limit per API key (429 with Retry-After).

Each key's bucket holds up to ``burst`` tokens and refills at ``rate_per_s``;
a request takes one token, or is refused with the seconds until one is there.
Pure bookkeeping over a clock, so it is tested without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets keyed by caller; ``take`` says whether a request may go now."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ):
        if rate_per_s <= 0 or burst < 1:
            raise ValueError(f"a rate limit needs rate_per_s > 0 and burst >= 1, got {rate_per_s}, {burst}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.clock = clock
        self.max_keys = max_keys  # bounds memory whatever the callers send
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str) -> float:
        """Take a token for ``key``: 0.0 when the request may go, else the seconds until it may."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            self._make_room(now)
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate_per_s)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate_per_s

    def _make_room(self, now: float) -> None:
        """Forget buckets that have refilled (a full bucket is the same as none); the oldest if all are busy."""
        if len(self._buckets) < self.max_keys:
            return
        full_after_s = self.burst / self.rate_per_s
        self._buckets = {k: b for k, b in self._buckets.items() if now - b.updated < full_after_s}
        while len(self._buckets) >= self.max_keys:
            del self._buckets[next(iter(self._buckets))]
