"""Robust estimates from noisy timings, and the rule for "this changed".

Timings on a shared edge box are noisy: a garbage-collection pause or a
neighbour's burst makes one sample 5× slower. Medians over a short window
ignore such outliers (two bad samples out of five cannot move a median of
five) while following a real change within about half a window.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

# A transfer shorter than this cannot tell bandwidths apart on a loaded host:
# scheduler and HTTP noise alone are of this order.
MIN_RESOLVABLE_TRANSFER_S = 0.004


class RollingMedian:
    """Median of the last ``window`` samples."""

    def __init__(self, window: int = 5):
        self._values: deque[float] = deque(maxlen=window)

    def add(self, value: float) -> None:
        """Add one sample."""
        self._values.append(value)

    def value(self) -> float | None:
        """The current median, or None before the first sample."""
        return statistics.median(self._values) if self._values else None

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        """Forget every sample."""
        self._values.clear()


@dataclass
class LinkEstimator:
    """RTT from small transfers, bandwidth from large ones, each a rolling median.

    A transfer of b bytes taking t seconds is modelled as t = rtt + b / bw.
    Small payloads (≤ ``small_bytes``) measure rtt; large ones give
    bw = b / (t − rtt). A large transfer that finishes within
    MIN_RESOLVABLE_TRANSFER_S of the RTT only says "at least this fast", and
    is recorded as that lower bound so the median stays honest.
    """

    small_bytes: int = 8192
    window: int = 5
    rtt: RollingMedian = field(init=False)
    bandwidth: RollingMedian = field(init=False)
    resolvable_bytes_per_s: float | None = None
    samples: int = 0
    bandwidth_samples: int = 0  # of ``samples``, those that measured bandwidth (large transfers)

    def __post_init__(self) -> None:
        self.rtt = RollingMedian(self.window)
        self.bandwidth = RollingMedian(self.window)

    def add_pair(self, small: tuple[int, float], large: tuple[int, float]) -> None:
        """A small and a large probe sent back to back: their difference is the transfer alone.

        Differencing cancels the per-request overhead they share (HTTP,
        scheduling, RTT), which on a busy host is of the same order as the
        transfer itself and would otherwise bias the bandwidth upwards.
        """
        (b_small, t_small), (b_large, t_large) = small, large
        self.samples += 1
        self.rtt.add(t_small)
        transfer = max(t_large - t_small, MIN_RESOLVABLE_TRANSFER_S)
        self.resolvable_bytes_per_s = (b_large - b_small) / MIN_RESOLVABLE_TRANSFER_S
        self.bandwidth.add((b_large - b_small) / transfer)
        self.bandwidth_samples += 1

    def add(self, nbytes: int, seconds: float) -> None:
        """Record one transfer of ``nbytes`` that took ``seconds`` end to end."""
        self.samples += 1
        if nbytes <= self.small_bytes:
            self.rtt.add(seconds)
            return
        rtt = self.rtt.value() or 0.0
        transfer = max(seconds - rtt, MIN_RESOLVABLE_TRANSFER_S)
        self.resolvable_bytes_per_s = nbytes / MIN_RESOLVABLE_TRANSFER_S
        self.bandwidth.add(nbytes / transfer)
        self.bandwidth_samples += 1


# One RTT sample this far from the link's median says the link itself changed,
# not the host: a factor of 2 and at least 10 ms (loopback noise on a busy
# 2-core host reaches a few ms; a GC pause can pass 10 ms, which is why a jump
# only asks for more samples and never replaces the median by itself).
RTT_JUMP_FACTOR = 2.0
RTT_JUMP_MIN_S = 0.010


def rtt_jumped(median: float | None, sample: float) -> bool:
    """Whether one RTT ``sample`` is far enough from the link's ``median`` to be worth re-measuring now."""
    if median is None:
        return False
    return abs(sample - median) >= max(RTT_JUMP_MIN_S, (RTT_JUMP_FACTOR - 1.0) * min(sample, median))


def relative_change(old: float, new: float) -> float:
    """|new − old| / old, with 0 → anything counting as infinite change."""
    if old <= 0:
        return float("inf") if new > 0 else 0.0
    return abs(new - old) / old


# A bandwidth change matters to a plan only if it changes how long a typical
# activation takes to cross: 64 KiB is a 28-token SmolLM2 prefill at fp32.
REFERENCE_TRANSFER_BYTES = 64 * 1024
MIN_TRANSFER_CHANGE_S = 0.001


def bandwidth_changed(old: float, new: float, threshold: float, resolvable: float | None) -> bool:
    """Whether a bandwidth moved past ``threshold`` *and* by enough to change a transfer's time.

    Moves between two speeds the probes cannot resolve, or that change a
    reference transfer by under a millisecond (loopback at 100 vs 200 MB/s),
    are noise to a planner and raise nothing.
    """
    if resolvable is not None and min(old, new) >= resolvable:
        return False  # both are "faster than we can measure": nothing to report
    delta_s = abs(REFERENCE_TRANSFER_BYTES / old - REFERENCE_TRANSFER_BYTES / new)
    return relative_change(old, new) > threshold and delta_s > MIN_TRANSFER_CHANGE_S


def rtt_changed(old: float, new: float, threshold: float, floor_s: float = 0.003) -> bool:
    """Whether an RTT moved past ``threshold`` and by more than ``floor_s`` (sub-ms jitter is noise)."""
    return abs(new - old) > floor_s and relative_change(old, new) > threshold
