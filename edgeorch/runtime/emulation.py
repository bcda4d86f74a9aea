"""Emulated compute slowdown: a k-times slower node, made of real waiting.

A slowed node must be slower on the wall clock, not in arithmetic: every
figure that says how fast it is (the compute time of a step, a calibration, a
speed probe) reads the clock after the wait, so a wait that did not happen
shows as a node that is not slow.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from edgeorch.monitoring.estimators import RollingMedian


class SlowdownHold:
    """Holds the calling thread so that work begun at ``t0`` lasts ``k`` times as long.

    Waking from a sleep costs more than the sleep asked for: the thread must
    take the GIL back from the event loop (up to the 5 ms switch interval)
    and get a core back on a busy host. A really slower node does not pay
    that, and read from the clock it made nodes slowed 4x measure 4.8-5.5x
    on the 2 ms speed probe. So the hold learns how late its recent wake-ups
    were (a rolling median) and asks for that much less: the wait is still
    real and still read from the clock, but it ends on time on average.
    """

    def __init__(self, slowdown: Callable[[], float], window: int = 15):
        self._slowdown = slowdown
        self._late_s = RollingMedian(window)

    def __call__(self, t0: float) -> float:
        """Wait until ``t0 + k × (now − t0)``; return the seconds since ``t0`` as the clock reads them."""
        now = time.perf_counter()
        k = self._slowdown()
        if k > 1.0:
            remaining = (now - t0) * (k - 1.0)
            asked = max(0.0, remaining - (self._late_s.value() or 0.0))
            time.sleep(asked)
            woke = time.perf_counter()
            self._late_s.add(max(0.0, woke - now - asked))
            now = woke
        return now - t0


def perturbed(h: torch.Tensor, size: float, rng: torch.Generator) -> torch.Tensor:
    """``h`` plus Gaussian noise of ``size`` times its RMS: a node that tampers with what it computes.

    For the spot checks' tests and benchmark (``Emulation.perturb``): every
    output of the node is wrong, by an amount that may or may not change a
    greedy token.
    """
    rms = h.float().pow(2).mean().sqrt()
    noise = torch.randn(h.shape, generator=rng, dtype=torch.float32)
    return (h.float() + noise * (size * rms)).to(h.dtype)
