"""The emulated slowdown is real waiting that the clock sees, in steps and in calibration."""

from __future__ import annotations

import statistics
import time

from edgeorch.runtime.emulation import SlowdownHold
from edgeorch.runtime.probes import REPEATS, calibrate, load_probe


def _busy(seconds: float) -> float:
    """Burn ``seconds`` of CPU, the stand-in for a step's compute; returns its start."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pass
    return t0


def test_a_hold_makes_a_step_last_k_times_on_the_wall_clock() -> None:
    k = 4.0
    hold = SlowdownHold(lambda: k)
    took = []
    for _ in range(7):
        t0 = _busy(0.01)
        reported = hold(t0)
        wall = time.perf_counter() - t0
        # What the hold reports is the clock, not elapsed × k.
        assert reported <= wall
        took.append(wall)
    # Median of 7: one step delayed by a busy neighbour cannot move it. Without the
    # wait a step lasts 10 ms; with it, 40 ms. Lateness on a busy host only lengthens it.
    assert 0.03 <= statistics.median(took) <= 0.08, took


def test_no_slowdown_holds_nothing() -> None:
    hold = SlowdownHold(lambda: 1.0)
    t0 = time.perf_counter()
    assert hold(t0) < 0.005


def test_calibration_reads_the_clock_after_the_hold(store) -> None:
    probe = load_probe("tiny-llama", store.path("tiny-llama"))
    held = []

    def hold(t0: float) -> float:
        """A node that waits 30 ms after every block of steps."""
        held.append(t0)
        time.sleep(0.03)
        return time.perf_counter() - t0

    report = calibrate(probe, hold)
    assert held, "calibration never held"
    # Every figure includes the wait (a block of REPEATS steps, then 30 ms), however
    # fast the steps themselves ran: the speed is what the clock saw.
    for unit in report.units:
        assert min(unit.prefill_s, unit.decode_s) >= 0.03 / REPEATS, unit
    assert report.took_s >= 0.03 * len(held)
