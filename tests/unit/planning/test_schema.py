"""The request model rejects malformed input with the field at fault (a 422 at the service)."""

from __future__ import annotations

import copy
import json

import pytest
from pydantic import ValidationError

from edgeorch.schemas.plan import PlanRequest

GOOD = {
    "profile": {
        "model": "tiny",
        "units": [
            {
                "name": "embed",
                "param_bytes": 100,
                "flops_per_token": 1e3,
                "out_bytes_per_token": 64,
                "kv_bytes_per_token": 0,
            },
            {
                "name": "l0",
                "param_bytes": 200,
                "flops_per_token": 1e9,
                "out_bytes_per_token": 64,
                "kv_bytes_per_token": 2,
            },
            {
                "name": "head",
                "param_bytes": 100,
                "flops_per_token": 2e8,
                "out_bytes_per_token": 4,
                "kv_bytes_per_token": 0,
            },
        ],
    },
    "nodes": [
        {"id": "a", "memory_bytes": 1000, "flops_per_s": 1e9, "trusted": True, "watts": 5},
        {"id": "b", "memory_bytes": 1000, "flops_per_s": 1e10, "watts": 50},
    ],
    "links": [
        {"src": "a", "dst": "b", "bandwidth_bytes_per_s": 1e6, "rtt_s": 0.001},
        {"src": "b", "dst": "a", "bandwidth_bytes_per_s": 1e6, "rtt_s": 0.001},
    ],
    "source": "a",
    "trusted_units": [0, 2],
}


def with_(path: str, value) -> dict:
    """GOOD with one field replaced; path like "nodes.0.watts"."""
    doc = copy.deepcopy(GOOD)
    *parents, leaf = path.split(".")
    target = doc
    for key in parents:
        target = target[int(key)] if key.isdigit() else target[key]
    target[int(leaf) if leaf.isdigit() else leaf] = value
    return doc


def test_good_request_validates() -> None:
    req = PlanRequest.model_validate(GOOD)
    assert req.objective == "latency" and req.strategy == "optimal"


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        ("nodes.0.memory_bytes", -1, "greater than or equal"),
        ("nodes.0.watts", -5, "greater than or equal"),
        ("nodes.1.flops_per_s", 0, "greater than or equal"),
        ("links.0.rtt_s", -0.1, "greater than or equal"),
        ("links.0.bandwidth_bytes_per_s", float("inf"), "finite"),
        ("links.0.dst", "zzz", "unknown node ids"),
        ("links.1.dst", "b", "self-loop"),
        ("source", "nowhere", "not one of the nodes"),
        ("nodes.1.id", "a", "duplicate node ids"),
        ("trusted_units", [0, 3], "out of range"),
        ("trusted_units", [0, 0], "twice"),
        ("current_plan", [{"node": "a", "start": 0, "end": 2}], "ends at unit 2"),
        ("current_plan", [{"node": "a", "start": 0, "end": 1}, {"node": "b", "start": 2, "end": 3}], "tile"),
        ("current_plan", [{"node": "a", "start": 1, "end": 1}], "empty"),
        ("workload", {"prompt_tokens": 0, "generated_tokens": 0}, "at least 1"),
        ("objective", "speed", "latency"),
        ("strategy", "magic", "optimal"),
        ("max_migration_bytes", -1, "greater than or equal"),
        ("time_limit_s", 0, "greater than"),
        ("nodes.0.colour", "red", "Extra inputs"),
    ],
)
def test_malformed_requests_are_rejected(path: str, value, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        PlanRequest.model_validate(with_(path, value))


def test_nan_in_json_is_rejected() -> None:
    text = json.dumps(GOOD).replace('"rtt_s": 0.001', '"rtt_s": NaN', 1)
    with pytest.raises(ValidationError, match="finite"):
        PlanRequest.model_validate_json(text)


def test_duplicate_links_are_rejected() -> None:
    doc = copy.deepcopy(GOOD)
    doc["links"].append(dict(doc["links"][0]))
    with pytest.raises(ValidationError, match="given twice"):
        PlanRequest.model_validate(doc)


def test_weight_with_throughput_is_rejected() -> None:
    doc = {**GOOD, "objective": "throughput", "migration_weight": 1.0}
    with pytest.raises(ValidationError, match="no unit for objective throughput"):
        PlanRequest.model_validate(doc)


def test_current_plan_may_name_a_node_that_is_gone() -> None:
    doc = {**GOOD, "current_plan": [{"node": "lost", "start": 0, "end": 3}]}
    assert PlanRequest.model_validate(doc).current_plan[0].node == "lost"


def test_absurd_sizes_are_rejected_before_planning() -> None:
    doc = with_("profile.units.1.param_bytes", 10**30)
    with pytest.raises(ValidationError, match="more than any node could hold"):
        PlanRequest.model_validate(doc)
