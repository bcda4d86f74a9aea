"""The splitter as a real process on a loopback port: plans, 422s with causes, probes, metrics."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support import ServiceProcess, free_port

UNITS = [
    {
        "name": "embed",
        "param_bytes": 1000,
        "flops_per_token": 1e3,
        "out_bytes_per_token": 256,
        "kv_bytes_per_token": 0,
    },
    *[
        {
            "name": f"layer{i}",
            "param_bytes": 5000,
            "flops_per_token": 1e8,
            "out_bytes_per_token": 256,
            "kv_bytes_per_token": 2,
        }
        for i in range(4)
    ],
    {
        "name": "head",
        "param_bytes": 2000,
        "flops_per_token": 4e7,
        "out_bytes_per_token": 4,
        "kv_bytes_per_token": 0,
    },
]
GOOD = {
    "profile": {"model": "tiny", "units": UNITS},
    "nodes": [
        {"id": "edge", "memory_bytes": 10_000, "flops_per_s": 1e9, "trusted": True, "watts": 5},
        {"id": "gpu", "memory_bytes": 40_000, "flops_per_s": 5e10, "watts": 200},
        {"id": "nuc", "memory_bytes": 20_000, "flops_per_s": 5e9, "watts": 40},
    ],
    "links": [
        {"src": a, "dst": b, "bandwidth_bytes_per_s": 1.25e7, "rtt_s": 0.002}
        for a in ("edge", "gpu", "nuc")
        for b in ("edge", "gpu", "nuc")
        if a != b
    ],
    "source": "edge",
    "workload": {"prompt_tokens": 32, "generated_tokens": 32, "max_sessions": 2, "context_tokens": 256},
    "trusted_units": [0, 5],
}


@pytest.fixture(scope="module")
def splitter(tmp_path_factory):
    proc = ServiceProcess(
        ["splitter"], free_port(), log_path=tmp_path_factory.mktemp("logs") / "splitter.log"
    )
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.kill()


def post(splitter, body) -> httpx.Response:
    if isinstance(body, str):
        return httpx.post(
            splitter.url + "/v1/plan", content=body, headers={"content-type": "application/json"}, timeout=30
        )
    return httpx.post(splitter.url + "/v1/plan", json=body, timeout=30)


def test_good_request_gets_an_optimal_u_shaped_plan(splitter) -> None:
    r = post(splitter, GOOD)
    assert r.status_code == 200, r.text
    body = r.json()
    nodes = [s["node"] for s in body["stages"]]
    assert nodes[0] == "edge" and nodes[-1] == "edge"  # embedding and head stay on the trusted source
    assert body["stages"][0]["start"] == 0 and body["stages"][-1]["end"] == 6
    assert body["solver"]["optimal"] is True and body["solver"]["gap"] == 0.0
    assert body["predicted"]["latency_s"] > 0 and body["predicted"]["throughput_tokens_per_s"] > 0
    assert body["migration_bytes"] == 0 and body["revision"] is None
    explanation = body["explanation"]
    assert len(explanation["stages"]) == len(body["stages"])
    assert all(h["transfer_s"] > 0 for h in explanation["hops"])
    assert explanation["bottleneck"]["kind"] in ("node_compute", "link_transfer")


def test_baseline_strategy_and_revision(splitter) -> None:
    current = [
        {"node": "edge", "start": 0, "end": 1},
        {"node": "gpu", "start": 1, "end": 5},
        {"node": "edge", "start": 5, "end": 6},
    ]
    r = post(
        splitter,
        {**GOOD, "strategy": "two_way", "objective": "energy", "trusted_units": [], "current_plan": current},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["solver"]["strategy"] == "two_way" and body["solver"]["optimal"] is False
    assert body["revision"]["kind"] in ("keep", "remap", "resplit")
    assert body["revision"]["migration_bytes"] == body["migration_bytes"]
    assert body["revision"]["current_feasible"] is True
    assert body["revision"]["current_predicted"]["energy_j"] > 0


def test_infeasible_request_names_the_cause(splitter) -> None:
    doc = json.loads(json.dumps(GOOD))
    doc["nodes"][0]["memory_bytes"] = 2500  # the trusted source cannot hold embedding + head (3000 bytes)
    r = post(splitter, doc)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail["error"] == "infeasible"
    cause = detail["causes"][0]
    assert cause["kind"] == "trusted_memory"
    assert cause["short_by_bytes"] == {"edge": 500}


@pytest.mark.parametrize(
    "body",
    [
        json.dumps(GOOD).replace('"rtt_s": 0.002', '"rtt_s": NaN', 1),
        json.dumps(GOOD).replace('"memory_bytes": 40000', '"memory_bytes": -40000', 1),
        json.dumps(GOOD).replace('"dst": "gpu"', '"dst": "mars"', 1),
        json.dumps({**GOOD, "current_plan": [{"node": "edge", "start": 0, "end": 4}]}),
        json.dumps({**GOOD, "current_plan": [{"node": "edge", "start": 2, "end": 6}]}),
        json.dumps({**GOOD, "trusted_units": [9]}),
        json.dumps({**GOOD, "source": "nowhere"}),
        json.dumps(GOOD)[:-5],
        "[]",
        "",
    ],
)
def test_malformed_requests_are_422_never_500(splitter, body: str) -> None:
    r = post(splitter, body)
    assert r.status_code == 422, r.text
    assert "detail" in r.json()


def test_probes_metrics_and_openapi(splitter) -> None:
    assert httpx.get(splitter.url + "/healthz").json()["status"] == "ok"
    assert httpx.get(splitter.url + "/readyz").status_code == 200
    post(splitter, GOOD)
    doc = json.loads(json.dumps(GOOD))
    doc["nodes"][0]["memory_bytes"] = 100
    post(splitter, doc)
    metrics = httpx.get(splitter.url + "/metrics").text
    assert 'splitter_plans_total{objective="latency",optimal="true",strategy="optimal"}' in metrics
    assert 'splitter_infeasible_total{objective="latency",strategy="optimal"}' in metrics
    assert "splitter_planning_seconds_bucket" in metrics
    spec = httpx.get(splitter.url + "/openapi.json").json()
    assert "/v1/plan" in spec["paths"]
    assert "PlanRequest" in spec["components"]["schemas"]
    assert httpx.get(splitter.url + "/docs").status_code == 200
