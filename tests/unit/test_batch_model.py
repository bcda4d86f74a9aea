"""The batch term of the cost model (edgeorch/planning/batching.py) against hand-computed cases."""

from __future__ import annotations

import pytest

from edgeorch.planning.batching import fit_growth, predict_serving


def test_fit_is_exact_on_a_linear_batch_cost():
    # step(B) = 10 ms * (1 + 0.25 (B - 1)): 10, 12.5, 17.5, 27.5 ms
    assert fit_growth({1: 0.010, 2: 0.0125, 4: 0.0175, 8: 0.0275}) == pytest.approx(0.25)


def test_fit_from_the_measured_smollm2_speedups():
    # bench/batch_step, SmolLM2 fp32, 1 thread: a batch of N ran speedup(N) times N single steps.
    speedups = {2: 1.60, 4: 3.71, 8: 4.22}
    steps = {1: 1.0, **{n: n / s for n, s in speedups.items()}}
    # least squares through (0, 0): x = 1, 3, 7; y = 0.25, 0.0782, 0.8957 -> 0.1145
    x, y = [1, 3, 7], [2 / 1.60 - 1, 4 / 3.71 - 1, 8 / 4.22 - 1]
    expected = sum(a * b for a, b in zip(x, y, strict=True)) / sum(a * a for a in x)
    assert fit_growth(steps) == pytest.approx(expected)
    assert 0.11 < fit_growth(steps) < 0.12


def test_fit_clamps_noise_and_refuses_what_it_cannot_fit():
    assert fit_growth({1: 1.0, 4: 5.0}) == 1.0  # slower than single steps: no gain, not worse
    assert fit_growth({1: 1.0, 4: 0.5}) == 0.0  # faster than one step: free rows at most
    with pytest.raises(ValueError):
        fit_growth({2: 1.0, 4: 2.0})
    with pytest.raises(ValueError):
        fit_growth({1: 1.0})


def test_prediction_by_hand():
    # 60 ms of compute, 10 ms of hops, growth 0.125, 8 sessions:
    # cycle = 60 * (1 + 0.875) + 10 = 122.5 ms; 8 / 0.1225 = 65.3 tok/s; one stream 1 / 0.07 = 14.29
    p = predict_serving(0.060, 0.010, 8, 0.125)
    assert p.cycle_s == pytest.approx(0.1225)
    assert p.tokens_per_s == pytest.approx(8 / 0.1225)
    assert p.x_one == pytest.approx((8 / 0.1225) * 0.070)
    one = predict_serving(0.060, 0.010, 1, 0.125)
    assert one.x_one == pytest.approx(1.0) and one.cycle_s == pytest.approx(0.070)


def test_no_batching_gain_means_no_throughput_gain():
    p = predict_serving(0.050, 0.0, 16, 1.0)
    assert p.x_one == pytest.approx(1.0)
    assert p.cycle_s == pytest.approx(16 * 0.050)


def test_prediction_refuses_nonsense():
    with pytest.raises(ValueError):
        predict_serving(0.05, 0.01, 0, 0.1)
    with pytest.raises(ValueError):
        predict_serving(0.0, 0.0, 4, 0.1)
