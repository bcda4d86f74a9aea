"""Infeasible requests: the causes name the units, nodes, shortfalls and links involved."""

from __future__ import annotations

import pytest

from edgeorch.planning import InfeasibleError, Stage, Workload, build_problem, plan_optimal
from edgeorch.planning.diagnose import packing_causes
from tests.unit.planning.test_optimal import chain


def causes_of(problem) -> dict:
    with pytest.raises(InfeasibleError) as caught:
        plan_optimal(problem)
    return {c.kind: c for c in caught.value.causes}


def test_trusted_units_without_any_trusted_node() -> None:
    causes = causes_of(chain(trusted=[False, False]))
    assert causes["no_trusted_host"].units == (0, 5)


def test_unit_larger_than_every_node() -> None:
    causes = causes_of(chain(param_bytes=[100, 200, 50_000, 200, 200, 100], trusted_units=[]))
    assert causes["unit_too_large"].units == (2,)
    assert causes["unit_too_large"].short_by_bytes == {"S": 40_000}


def test_cluster_short_of_memory_in_total() -> None:
    causes = causes_of(chain(memory_bytes=[300, 500], trusted_units=[]))
    assert causes["insufficient_memory"].short_by_bytes == {"total": 1000 - 800}


def test_single_trusted_node_short_for_the_trusted_units() -> None:
    causes = causes_of(chain(param_bytes=[300, 200, 200, 200, 200, 300], memory_bytes=[500, 10_000]))
    assert causes["trusted_memory"].short_by_bytes == {"S": 100}
    assert causes["trusted_memory"].units == (0, 5)


def test_trusted_node_cut_off_from_the_source() -> None:
    problem = chain(trusted=[False, True], links=[])
    causes = causes_of(problem)
    assert causes["unreachable"].nodes == ("F",)
    assert set(causes["unreachable"].links) == {("S", "F"), ("F", "S")}


def test_plan_needs_links_that_do_not_exist() -> None:
    # Only C is trusted and must run unit 0; B runs unit 1. A (the source) holds nothing.
    # A->B->C->A is a cycle, but the plan needs A->C, C->B and B->A.
    problem = build_problem(
        unit_names=["embed", "head"],
        param_bytes=[10, 10],
        flops_per_token=[1.0, 1.0],
        out_bytes_per_token=[1.0, 1.0],
        kv_bytes_per_token=[0.0, 0.0],
        node_ids=["A", "B", "C"],
        memory_bytes=[0, 10, 10],
        flops_per_s=[1.0, 1.0, 1.0],
        trusted=[False, False, True],
        watts=[1.0, 1.0, 1.0],
        links=[("A", "B", 1.0, 0.0), ("B", "C", 1.0, 0.0), ("C", "A", 1.0, 0.0)],
        source="A",
        workload=Workload(),
        trusted_units=[0],
    )
    causes = causes_of(problem)
    assert set(causes["missing_link"].links) == {("A", "C"), ("C", "B"), ("B", "A")}


def test_memory_that_only_fits_in_fractions_of_units() -> None:
    # 3 units of 200 bytes, two nodes of 300: 600 bytes in total, enough on
    # paper, but a node holds one whole unit, so at most 400 bytes fit.
    problem = chain(n_layers=1, param_bytes=[200, 200, 200], memory_bytes=[300, 300], trusted_units=[])
    cause = causes_of(problem)["insufficient_memory"]
    assert cause.short_by_bytes == {"total": 200}
    assert "whole units" in cause.message


def test_packing_cause_names_the_overfull_nodes_of_a_relaxed_plan() -> None:
    problem = chain(n_layers=1, param_bytes=[200, 200, 200], memory_bytes=[300, 300], trusted_units=[])
    causes = packing_causes(problem, (Stage(0, 0, 1), Stage(1, 1, 2), Stage(0, 2, 3)))
    assert causes[0].kind == "memory"
    assert causes[0].short_by_bytes == {"S": 100}
