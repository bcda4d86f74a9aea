"""The orchestrator judges plans on their own nodes' figures (snapshot.restricted, issue 23): on a
fleet of uneven nodes and links, every prediction and format choice equals the whole fleet's."""

from __future__ import annotations

import random

import pytest

from edgeorch.orchestration.decide import reformat_candidate
from edgeorch.orchestration.snapshot import (
    cluster_from_monitor,
    plan_request,
    predict,
    restricted,
    with_formats,
)
from edgeorch.schemas.monitor import LinkView, NodeView
from edgeorch.schemas.orchestrator import QosPolicy
from edgeorch.schemas.plan import PlanStage, Workload
from edgeorch.schemas.profile import ModelProfile, UnitProfile

MBIT = 1e6 / 8


def _fleet(seed: int, n: int = 14):
    rnd = random.Random(seed)
    ids = [f"n{i}" for i in range(n)]
    nodes = [NodeView(node_id=nid, state="alive", flops_per_s=rnd.uniform(2e8, 5e9), memory_bytes=10**9,
                      trusted=rnd.random() < 0.5, watts=rnd.uniform(2, 30), url=f"http://127.0.0.1:{9000 + i}",
                      speeds={}, profiles={}, live={}, capacity={"cores": 1, "memory_bytes": 10**9},
                      registered_at=0.0, last_seen=0.0)
             for i, nid in enumerate(ids)]  # fmt: skip
    # Some pairs measured (slow and fast), the rest left to the request's default link.
    links = [LinkView(src=s, dst=d, bandwidth_bytes_per_s=rnd.choice([1, 2, 10, 1000]) * MBIT,
                      rtt_s=rnd.uniform(0.0005, 0.08), resolvable_bytes_per_s=None, samples=3, updated_at=0.0)
             for s in ids for d in ids if s != d and rnd.random() < 0.6]  # fmt: skip
    units = [UnitProfile(name=f"u{i}", param_bytes=10**6, flops_per_token=rnd.uniform(1e6, 2e7),
                         out_bytes_per_token=4.0 * 2048, kv_bytes_per_token=9216.0) for i in range(8)]  # fmt: skip
    prefill = {nid: rnd.uniform(1e9, 2e10) for nid in ids if rnd.random() < 0.7}
    return ids, cluster_from_monitor(nodes, links, None, set()), ModelProfile(model="m", units=units), prefill


@pytest.mark.parametrize("seed", range(6))
def test_predictions_and_format_choices_on_the_plans_nodes_equal_the_whole_fleets(seed: int) -> None:
    rnd = random.Random(100 + seed)
    ids, cluster, profile, prefill = _fleet(seed)
    policy = QosPolicy(activation_formats=["fp32", "bf16", "int8"], quality_budget=0.05,
                       workload=Workload(prompt_tokens=400, generated_tokens=32, max_sessions=3))  # fmt: skip
    req = plan_request(profile, cluster, policy, None)
    cuts = sorted(rnd.sample(range(1, 8), 3))
    nodes = rnd.sample(ids, 4)
    current = [
        PlanStage(node=nd, start=a, end=b) for nd, a, b in zip(nodes, [0, *cuts], [*cuts, 8], strict=True)
    ]
    other = [
        PlanStage(node=nd, start=a, end=b)
        for nd, a, b in zip(rnd.sample(ids, 2), [0, 5], [5, 8], strict=True)
    ]
    local = restricted(req, {s.node for s in (*current, *other)})
    assert len(local.nodes) < len(req.nodes) and len(local.links) < len(req.links)
    for stages in (current, other):
        assert predict(local, stages, prefill) == predict(req, stages, prefill)
        assert with_formats(local, stages, policy, prefill) == with_formats(req, stages, policy, prefill)
    assert reformat_candidate(local, current, policy, "keep", None, prefill) == reformat_candidate(
        req, current, policy, "keep", None, prefill
    )
    # A plan on a node the restriction left out is not judged on made-up figures.
    outside = next(n for n in ids if n not in {s.node for s in (*current, *other)} and n != req.source)
    assert predict(local, [PlanStage(node=outside, start=0, end=8)], prefill) is None
