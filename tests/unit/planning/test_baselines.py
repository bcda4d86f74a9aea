"""Baselines: their published rules, the same constraints, never better than optimal."""

from __future__ import annotations

import random

import numpy as np
import pytest

from edgeorch.planning import STRATEGIES, InfeasibleError, Stage, evaluate, plan_optimal, score, violations
from edgeorch.planning.baselines import (
    _choose_best_start,
    allocate_proportionally,
    petals_spans,
    two_way,
    vllm_partition,
)
from tests.unit.planning.oracle import random_instance
from tests.unit.planning.test_optimal import chain
from tests.unit.planning.test_oracle import to_problem


def test_vllm_partition_gives_the_remainder_to_the_middle_ranks() -> None:
    assert vllm_partition(30, 4) == [7, 8, 8, 7]
    assert vllm_partition(32, 3) == [11, 11, 10]
    assert vllm_partition(8, 8) == [1] * 8


def test_exo_allocation_is_largest_remainder_with_one_each() -> None:
    assert allocate_proportionally(10, [0.5, 0.3, 0.2]) == [5, 3, 2]
    assert allocate_proportionally(10, [0.95, 0.04, 0.01]) == [8, 1, 1]
    assert allocate_proportionally(7, [0.45, 0.35, 0.2]) == [3, 3, 1]


def test_petals_takes_the_least_served_span() -> None:
    assert _choose_best_start(np.array([3.0, 1.0, 1.0, 2.0]), 2) == 1
    assert _choose_best_start(np.zeros(5), 3) == 0


def test_petals_servers_spread_over_the_blocks() -> None:
    # Each node has room for 2 of the 4 layers; the second should serve the other half.
    problem = chain(memory_bytes=[200 + 400, 400], trusted_units=[])
    spans = petals_spans(problem)
    assert spans == {0: (1, 3), 1: (3, 5)}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_baseline_plans_are_feasible_on_a_roomy_cluster(name: str) -> None:
    problem = chain(trusted_units=[])
    result = STRATEGIES[name](problem)
    assert violations(problem, result.stages) == []
    assert result.solver == name and not result.optimal and result.bound is None


def test_even_splits_layers_evenly_with_embedding_and_head_at_the_ends() -> None:
    result = STRATEGIES["even"](chain(trusted_units=[]))
    assert result.stages == (Stage(0, 0, 3), Stage(1, 3, 6))


def test_greedy_throughput_keeps_embedding_and_head_on_the_client() -> None:
    result = STRATEGIES["greedy_throughput"](chain(trusted_units=[]))
    assert result.stages[0].node == 0 and result.stages[0].start == 0
    assert result.stages[-1].node == 0 and result.stages[-1].end == 6


def test_rule_that_breaks_memory_is_reported_with_the_node_and_shortfall() -> None:
    # even puts 2 layers (400 bytes) plus the embedding on S, which only has 300.
    problem = chain(memory_bytes=[300, 10_000], trusted_units=[])
    with pytest.raises(InfeasibleError) as caught:
        STRATEGIES["even"](problem)
    cause = caught.value.causes[0]
    assert cause.kind == "memory"
    assert cause.short_by_bytes == {"S": 200}


def test_rule_that_breaks_privacy_is_reported() -> None:
    # even puts the head (trusted) on F, which is not trusted.
    with pytest.raises(InfeasibleError) as caught:
        STRATEGIES["even"](chain())
    assert caught.value.causes[0].kind == "untrusted_host"
    assert caught.value.causes[0].units == (5,)


def test_two_way_is_the_best_single_split() -> None:
    problem = chain(trusted_units=[])
    best = min(
        score(problem, evaluate(problem, [s for s in (Stage(0, 0, k), Stage(1, k, 6)) if s.end > s.start]))
        for k in range(7)
    )
    assert two_way(problem).objective_value == pytest.approx(best)


@pytest.mark.parametrize("objective", ["latency", "throughput", "energy"])
def test_no_baseline_beats_the_optimal_planner(objective: str) -> None:
    rng = random.Random(99)
    compared = 0
    for _ in range(60):
        inst = random_instance(rng)
        inst.pop("cap", None)
        for node in inst["nodes"]:
            node["memory"] *= 4  # the oracle's instances are tight; baseline rules need some room
        problem = to_problem(inst, objective)
        try:
            best = plan_optimal(problem)
        except InfeasibleError:
            continue
        for name, rule in STRATEGIES.items():
            try:
                result = rule(problem)
            except InfeasibleError:
                continue
            compared += 1
            assert violations(problem, result.stages) == [], name
            assert result.objective_value >= best.objective_value * (1 - 1e-9), name
    assert compared >= 60
