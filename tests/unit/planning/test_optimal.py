"""The optimal planner's behaviour beyond the oracle: U-shape, limits, honesty at scale."""

from __future__ import annotations

import dataclasses
import random

import pytest

from bench.planner import make_cluster
from edgeorch.planning import (
    Stage,
    UnsupportedRequestError,
    Workload,
    build_problem,
    plan_optimal,
    violations,
)
from edgeorch.planning.problem import Problem


def chain(n_layers: int = 4, **overrides) -> Problem:
    """Source S (slow, trusted) and fast untrusted F; embedding and head must stay trusted."""
    args = dict(
        unit_names=["embed", *[f"l{i}" for i in range(n_layers)], "head"],
        param_bytes=[100] + [200] * n_layers + [100],
        flops_per_token=[1e3] + [1e9] * n_layers + [2e8],
        out_bytes_per_token=[64.0] * (n_layers + 1) + [4.0],
        kv_bytes_per_token=[0.0] * (n_layers + 2),
        node_ids=["S", "F"],
        memory_bytes=[10_000, 10_000],
        flops_per_s=[1e9, 1e11],
        trusted=[True, False],
        watts=[5.0, 100.0],
        links=[("S", "F", 1e8, 1e-3), ("F", "S", 1e8, 1e-3)],
        source="S",
        workload=Workload(prompt_tokens=16, generated_tokens=16, max_sessions=1, context_tokens=64),
        trusted_units=[0, n_layers + 1],
    )
    args.update(overrides)
    return build_problem(**args)


def test_trusted_ends_give_a_u_shaped_plan() -> None:
    result = plan_optimal(chain())
    assert result.stages == (Stage(0, 0, 1), Stage(1, 1, 5), Stage(0, 5, 6))
    assert result.optimal and result.gap == 0.0


def test_source_memory_is_shared_by_its_prefix_and_suffix() -> None:
    # S fits the embedding and head (200 bytes) plus one layer, not two; F holds only 3 layers.
    problem = chain(memory_bytes=[400, 600], flops_per_s=[1e9, 1.2e9])
    result = plan_optimal(problem)
    assert violations(problem, result.stages) == []
    assert result.evaluation.node_memory_bytes.tolist() == [400, 600]
    assert result.optimal


def test_energy_prefers_the_efficient_node() -> None:
    problem = chain(objective="energy", trusted_units=[], watts=[50.0, 100.0])
    # F: 100 W at 1e11 flop/s is 50x more efficient per flop than S: 50 W at 1e9.
    assert plan_optimal(problem).stages == (Stage(1, 0, 6),)


def test_throughput_balances_the_bottleneck() -> None:
    problem = chain(objective="throughput", trusted_units=[], flops_per_s=[1e9, 1e9])
    result = plan_optimal(problem)
    # Two layers a side, the head (0.2 s) with either: 2.2 s per token; 3 + 1 layers would be 3.
    assert result.evaluation.bottleneck_s_per_token == pytest.approx(2.2, rel=1e-6)
    assert result.optimal


def test_weight_has_no_meaning_for_throughput() -> None:
    problem = chain(objective="throughput", current_stages=[("S", 0, 6)], migration_weight=1.0)
    with pytest.raises(UnsupportedRequestError):
        plan_optimal(problem)


def test_nothing_to_compute_means_unbounded_throughput() -> None:
    problem = chain(flops_per_token=[0.0] * 6, trusted_units=[], links=[])
    result = plan_optimal(problem)
    assert result.stages == (Stage(0, 0, 6),)
    assert result.evaluation.throughput_tokens_per_s is None


def test_planning_is_deterministic() -> None:
    problem = make_cluster(random.Random(3), 12, 16, "latency")
    assert plan_optimal(problem).stages == plan_optimal(problem).stages


@pytest.mark.parametrize("objective", ["latency", "throughput", "energy"])
def test_time_limit_gives_a_feasible_plan_and_an_honest_bound(objective: str) -> None:
    # A 16-node cluster whose relaxation reuses nodes beyond their memory: the
    # search cannot finish in 50 ms, so it must say so and still be feasible.
    problem = dataclasses.replace(make_cluster(random.Random(5), 16, 32, objective), time_limit_s=0.05)
    result = plan_optimal(problem)
    assert violations(problem, result.stages) == []
    assert result.bound is not None and result.bound <= result.objective_value * (1 + 1e-9)
    if not result.optimal:
        assert result.gap > 0
        assert result.gap == pytest.approx((result.objective_value - result.bound) / result.objective_value)
    assert result.time_s < 2.0


def test_large_cluster_returns_within_budget() -> None:
    problem = make_cluster(random.Random(1), 200, 80, "latency", time_limit_s=1.0)
    result = plan_optimal(problem)
    assert violations(problem, result.stages) == []
    assert result.time_s < 3.0
