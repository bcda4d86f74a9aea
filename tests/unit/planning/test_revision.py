"""Split Revision: keep / remap / resplit, migration bytes, and the weight and cap on them."""

from __future__ import annotations

import pytest

from edgeorch.planning import Stage, classify, plan_optimal
from edgeorch.planning.api import plan_request
from edgeorch.planning.errors import InfeasibleError
from edgeorch.planning.revision import revise
from tests.unit.planning.test_optimal import chain


@pytest.mark.parametrize(
    ("current", "new", "kind"),
    [
        ([("a", 0, 3), ("b", 3, 6)], [("a", 0, 3), ("b", 3, 6)], "keep"),
        ([("a", 0, 2), ("a", 2, 3), ("b", 3, 6)], [("a", 0, 3), ("b", 3, 6)], "keep"),
        ([("a", 0, 3), ("b", 3, 6)], [("c", 0, 3), ("b", 3, 6)], "remap"),
        ([("a", 0, 3), ("b", 3, 6)], [("b", 0, 3), ("a", 3, 6)], "remap"),
        ([("a", 0, 3), ("b", 3, 6)], [("a", 0, 4), ("b", 4, 6)], "resplit"),
        ([("a", 0, 6)], [("a", 0, 3), ("b", 3, 6)], "resplit"),
    ],
)
def test_classify(current, new, kind) -> None:
    assert classify(current, new) == kind


def fast_node_appears() -> dict:
    """The model runs on S alone; F (100x faster) has just joined."""
    return dict(trusted_units=[], current_stages=[("S", 0, 6)])


def test_without_weight_the_planner_moves_to_the_fast_node() -> None:
    problem = chain(**fast_node_appears())
    result = plan_optimal(problem)
    report = revise(problem, result.stages)
    assert result.stages == (Stage(1, 0, 6),)
    assert report.kind == "remap"  # the same single range, on another node
    assert report.moved_units == tuple(range(6))
    assert report.migration_bytes == int(problem.param_bytes.sum())
    assert report.current_feasible


def test_privacy_turns_the_move_into_a_resplit() -> None:
    problem = chain(current_stages=[("S", 0, 6)])  # embedding and head must stay on S
    report = revise(problem, plan_optimal(problem).stages)
    assert report.kind == "resplit"
    assert report.moved_units == (1, 2, 3, 4)
    assert report.migration_bytes == 800


def test_a_heavy_weight_keeps_the_current_plan() -> None:
    # Moving the layers to F saves ~125 s of compute; at 1 s per byte their 800 bytes cost more.
    result = plan_optimal(chain(migration_weight=1.0, **fast_node_appears()))
    assert result.stages == (Stage(0, 0, 6),)
    assert result.evaluation.migration_bytes == 0


def test_a_light_weight_still_moves() -> None:
    result = plan_optimal(chain(migration_weight=1e-9, **fast_node_appears()))
    assert result.evaluation.migration_bytes > 0


def test_cap_limits_the_bytes_that_move() -> None:
    problem = chain(max_migration_bytes=400, **fast_node_appears())
    result = plan_optimal(problem)
    assert 0 < result.evaluation.migration_bytes <= 400
    assert result.optimal


def test_units_on_a_lost_node_must_move() -> None:
    problem = chain(trusted_units=[], current_stages=[("S", 0, 3), ("gone", 3, 6)])
    result = plan_optimal(problem)
    report = revise(problem, result.stages)
    assert {3, 4, 5} <= set(report.moved_units)
    assert not report.current_feasible
    assert report.current_violations[0].kind == "node_gone"
    assert report.current_evaluation is None


def test_cap_below_what_must_move_is_infeasible() -> None:
    problem = chain(trusted_units=[], current_stages=[("S", 0, 3), ("gone", 3, 6)], max_migration_bytes=100)
    with pytest.raises(InfeasibleError) as caught:
        plan_optimal(problem)
    cause = caught.value.causes[0]
    assert cause.kind == "migration_cap"
    assert cause.units == (3, 4, 5)


def test_response_reports_revision_and_current_prediction() -> None:
    from edgeorch.schemas.plan import PlanRequest

    req = PlanRequest.model_validate(
        {
            "profile": {
                "model": "m",
                "units": [
                    {
                        "name": n,
                        "param_bytes": 100,
                        "flops_per_token": 1e9,
                        "out_bytes_per_token": 8,
                        "kv_bytes_per_token": 0,
                    }
                    for n in ("embed", "l0", "head")
                ],
            },
            "nodes": [
                {"id": "a", "memory_bytes": 1000, "flops_per_s": 1e9, "watts": 1},
                {"id": "b", "memory_bytes": 1000, "flops_per_s": 1e9, "watts": 1},
            ],
            "links": [
                {"src": "a", "dst": "b", "bandwidth_bytes_per_s": 1e6, "rtt_s": 0.01},
                {"src": "b", "dst": "a", "bandwidth_bytes_per_s": 1e6, "rtt_s": 0.01},
            ],
            "source": "a",
            "current_plan": [{"node": "b", "start": 0, "end": 3}],
        }
    )
    response = plan_request(req)
    assert [s.model_dump() for s in response.stages] == [{"node": "a", "start": 0, "end": 3}]
    assert response.revision.kind == "remap"
    assert response.migration_bytes == 300 == response.revision.migration_bytes
    assert response.revision.current_predicted.latency_s > response.predicted.latency_s
