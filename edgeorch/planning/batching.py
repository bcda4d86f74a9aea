"""What batching does to a decode step, and so to many users' throughput: pure functions, no I/O.

A stage runs the decode steps of several sessions as one forward
(``runtime/batching.py``): the weights are read once per batch, so a batch
of B rows costs far less than B single steps. We model a batched step as

    step(B) = step(1) * (1 + growth * (B - 1))

``growth`` is the share of a single step each extra row adds (0: free rows,
1: no gain from batching). It is fitted to measured per-batch step times
(:func:`fit_growth`, e.g. from ``bench/batch_step.py``). On SmolLM2 fp32 at
one thread, batches of 2, 4 and 8 ran 1.60x, 3.71x and 4.22x as many single
steps: growth ≈ 0.114.

With B sessions generating at once and every stage batching all of them,
each token of every session costs one batched step per stage plus the hops,
so the chain delivers B tokens per cycle:

    cycle(B) = compute(1) * (1 + growth * (B - 1)) + hops
    aggregate tok/s = B / cycle(B);  inter-token latency = cycle(B)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Fitted (fit_growth) to bench/batch_step.py on SmolLM2 fp32, one thread per process (stop 27:
# 1.60x at 2, 3.71x at 4, 4.22x at 8). The planner's predictions use it for every model until the
# workers' own per-batch step times are fitted per node (not built).
BATCH_GROWTH = 0.114


def fit_growth(step_s_by_batch: Mapping[int, float]) -> float:
    """Least-squares ``growth`` through the measured ``{batch: step seconds}`` (batch 1 required).

    The fit goes through the single step exactly (it is the unit every other
    size is measured in) and is clamped to [0, 1]: a batch that measured
    slower than single steps one after the other is noise, not a model.
    """
    if 1 not in step_s_by_batch or step_s_by_batch[1] <= 0:
        raise ValueError("fit_growth needs the single step's time (batch 1), positive")
    one = step_s_by_batch[1]
    pairs = [(b - 1, t / one - 1) for b, t in step_s_by_batch.items() if b > 1]
    if not pairs:
        raise ValueError("fit_growth needs at least one batch larger than 1")
    growth = sum(x * y for x, y in pairs) / sum(x * x for x, _ in pairs)
    return min(1.0, max(0.0, growth))


@dataclass(frozen=True)
class ServingPrediction:
    """Predicted figures of one concurrency level."""

    sessions: int
    cycle_s: float  # one token of every session: the inter-token latency each sees
    tokens_per_s: float  # all sessions together
    x_one: float  # tokens_per_s over one session's


def predict_serving(compute_s: float, hop_s: float, sessions: int, growth: float) -> ServingPrediction:
    """Aggregate throughput and inter-token latency of ``sessions`` concurrent streams.

    ``compute_s``: one session's decode compute summed over the stages;
    ``hop_s``: the rest of one step (hops, framing, the gateway).
    """
    if sessions < 1:
        raise ValueError("sessions must be at least 1")
    if compute_s < 0 or hop_s < 0 or compute_s + hop_s <= 0:
        raise ValueError("compute_s and hop_s must be non-negative, not both zero")
    cycle = compute_s * (1 + growth * (sessions - 1)) + hop_s
    one = 1.0 / (compute_s + hop_s)
    rate = sessions / cycle
    return ServingPrediction(sessions, cycle, rate, rate / one)
