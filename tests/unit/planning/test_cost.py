"""The cost model of DESIGN.md §3 against cases computed by hand."""

from __future__ import annotations

import pytest

from edgeorch.planning import Stage, Workload, build_problem, evaluate, violations
from edgeorch.planning.problem import Problem

A, B = 0, 1


def two_nodes(**overrides) -> Problem:
    """3 units on source A (1 GFLOP/s, 10 W) and B (2 GFLOP/s, 20 W); P=2, G=3, S=2, C=10.

    Units: flops 1e9, 2e9, 1e9; out bytes 100, 200, 50; params 10, 20, 30;
    KV 1 byte/token on unit 1 only (so 1·10·2 = 20 bytes of cache).
    Links A->B 1000 B/s, rtt 0.1 s; B->A 500 B/s, rtt 0.2 s.
    """
    args = dict(
        unit_names=["embed", "layer", "head"],
        param_bytes=[10, 20, 30],
        flops_per_token=[1e9, 2e9, 1e9],
        out_bytes_per_token=[100.0, 200.0, 50.0],
        kv_bytes_per_token=[0.0, 1.0, 0.0],
        node_ids=["A", "B"],
        memory_bytes=[100, 100],
        flops_per_s=[1e9, 2e9],
        trusted=[True, False],
        watts=[10.0, 20.0],
        links=[("A", "B", 1000.0, 0.1), ("B", "A", 500.0, 0.2)],
        source="A",
        workload=Workload(prompt_tokens=2, generated_tokens=3, max_sessions=2, context_tokens=10),
    )
    args.update(overrides)
    return build_problem(**args)


def test_two_stage_plan_by_hand() -> None:
    ev = evaluate(two_nodes(), [Stage(A, 0, 1), Stage(B, 1, 3)])
    # compute: A 5·1e9/1e9 = 5 s; B 5·3e9/2e9 = 7.5 s
    assert [c.compute_s for c in ev.stages] == pytest.approx([5.0, 7.5])
    # hop A->B after unit 0: (1+3)·0.1/2 + 5·100/1000 = 0.7 s; exit B->A: (1+3)·0.2/2 + 5·4/500 = 0.44 s
    assert [h.transfer_s for h in ev.hops] == pytest.approx([0.7, 0.44])
    assert ev.latency_s == pytest.approx(13.64)
    assert ev.energy_j == pytest.approx(5 * 10 + 7.5 * 20)
    # per token: A 1 s, B 1.5 s, link A->B 0.1 s, link B->A 0.008 s
    assert ev.bottleneck_s_per_token == pytest.approx(1.5)
    assert ev.throughput_tokens_per_s == pytest.approx(1 / 1.5)
    assert ev.node_memory_bytes.tolist() == [10, 20 + 20 + 30]


def test_u_shape_sums_a_nodes_stages() -> None:
    ev = evaluate(two_nodes(), [Stage(A, 0, 1), Stage(B, 1, 2), Stage(A, 2, 3)])
    # A computes units 0 and 2 (10 s), B unit 1 (5 s); hop B->A carries unit 1's 200 bytes:
    # (1+3)·0.2/2 + 5·200/500 = 2.4 s; no exit hop: the last stage is on the source.
    assert ev.latency_s == pytest.approx(10 + 5 + 0.7 + 2.4)
    assert ev.node_load_s_per_token.tolist() == pytest.approx([2.0, 1.0])
    assert ev.bottleneck_s_per_token == pytest.approx(2.0)  # A's two stages together
    assert ev.node_memory_bytes.tolist() == [40, 40]


def test_all_on_source_has_no_hops() -> None:
    ev = evaluate(two_nodes(), [Stage(A, 0, 3)])
    assert ev.hops == ()
    assert ev.latency_s == pytest.approx(5 * 4e9 / 1e9)


def test_entry_hop_when_first_stage_is_elsewhere() -> None:
    ev = evaluate(two_nodes(), [Stage(B, 0, 3)])
    # entry A->B carries 4-byte token ids: (1+3)·0.1/2 + 5·4/1000 = 0.22 s
    assert [h.boundary for h in ev.hops] == [0, 3]
    assert ev.hops[0].transfer_s == pytest.approx(0.22)


def test_consecutive_stages_on_one_node_are_merged() -> None:
    split = evaluate(two_nodes(), [Stage(A, 0, 1), Stage(A, 1, 2), Stage(B, 2, 3)])
    whole = evaluate(two_nodes(), [Stage(A, 0, 2), Stage(B, 2, 3)])
    assert split.latency_s == whole.latency_s
    assert [c.stage for c in split.stages] == [Stage(A, 0, 2), Stage(B, 2, 3)]


def test_violations_name_memory_privacy_and_links() -> None:
    problem = two_nodes(memory_bytes=[100, 50], trusted_units=[2], links=[("A", "B", 1000.0, 0.1)])
    causes = {c.kind: c for c in violations(problem, [Stage(A, 0, 1), Stage(B, 1, 3)])}
    assert causes["memory"].short_by_bytes == {"B": 20}
    assert causes["untrusted_host"].units == (2,)
    assert causes["missing_link"].links == (("B", "A"),)
    assert violations(problem, [Stage(A, 0, 3)]) == []


def test_migration_counts_parameters_that_move() -> None:
    problem = two_nodes(current_stages=[("A", 0, 3)])
    ev = evaluate(problem, [Stage(A, 0, 1), Stage(B, 1, 3)])
    assert ev.moved_units == (1, 2)
    assert ev.migration_bytes == 50  # parameters only: KV caches are rebuilt, not moved


def test_plan_that_does_not_tile_the_chain_is_rejected() -> None:
    with pytest.raises(ValueError, match="tile"):
        evaluate(two_nodes(), [Stage(A, 0, 1), Stage(B, 2, 3)])
