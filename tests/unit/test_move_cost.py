"""Pricing a session's move to a newer plan (issue 21): its KV over the links or a replay, by hand;
the cheaper path on a slow and a fast link; the controller's basis keeps only the routes' nodes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgeorch.orchestration.move_cost import LOCAL_COPY_BYTES_PER_S, estimate_move
from edgeorch.orchestration.snapshot import cluster_from_monitor, move_basis, plan_request
from edgeorch.planning import Workload, build_problem
from edgeorch.schemas.monitor import LinkView, NodeView
from edgeorch.schemas.orchestrator import QosPolicy
from edgeorch.schemas.plan import PlanStage
from edgeorch.schemas.profile import ModelProfile, UnitProfile

HIDDEN = 576
KV = 9216.0  # one SmolLM2 layer's keys and values per token, fp32
MBIT = 1e6 / 8


def _problem(bandwidth: float, rtt: float = 0.0):
    """Three nodes at 1 GFLOP/s (prefill 10 GFLOP/s), four units of 5 MFLOP per token; units 1-2 hold KV."""
    ids = ["a", "b", "c"]
    links = [(s, d, bandwidth, rtt) for s in ids for d in ids if s != d]
    problem = build_problem(
        unit_names=["embed", "l1", "l2", "head"], param_bytes=[1, 1, 1, 1], flops_per_token=[5e6] * 4,
        out_bytes_per_token=[4.0 * HIDDEN] * 3 + [4.0], kv_bytes_per_token=[0.0, KV, KV, 0.0], node_ids=ids,
        memory_bytes=[10] * 3, flops_per_s=[1e9] * 3, trusted=[False] * 3, watts=[1.0] * 3, links=links,
        source="a", workload=Workload(prompt_tokens=250, generated_tokens=8, context_tokens=512),
    )  # fmt: skip
    return dataclasses.replace(problem, prefill_flops_per_s=np.full(3, 1e10))


OLD = [PlanStage(node="a", start=0, end=2), PlanStage(node="b", start=2, end=4)]
NEW = [PlanStage(node="a", start=0, end=1), PlanStage(node="c", start=1, end=4)]  # l1 a->c, l2 b->c


def test_migration_is_the_busiest_uplinks_kv_plus_a_hops_rtt_and_replay_a_prefill_by_hand() -> None:
    est = estimate_move(_problem(5 * MBIT, rtt=0.01), OLD, NEW, position=250)
    # l1's KV leaves a and l2's leaves b, concurrently on two uplinks: each 250 x 9,216 B at 625,000 B/s.
    assert est.bytes_remote == 2 * 250 * KV
    assert est.migrate_s == pytest.approx(250 * KV / 625_000 + 0.005)  # the cost model charges rtt/2 a hop
    # Replay: 250 tokens of 4 units at 10 GFLOP/s, the hop a->c of 250 hidden states, and the
    # entry hop's token ids (4 bytes each) into a, which is the source: no entry hop; the exit c->a.
    compute = 250 * 4 * 5e6 / 1e10
    hops = (250 * 4 * HIDDEN / 625_000 + 0.005) + (250 * 4 / 625_000 + 0.005)  # rtt/2 once per hop
    assert est.replay_s == pytest.approx(compute + hops)


def test_a_slow_link_replays_and_a_fast_one_migrates() -> None:
    slow = estimate_move(_problem(5 * MBIT), OLD, NEW, position=250)
    fast = estimate_move(_problem(1000 * MBIT), OLD, NEW, position=250)
    assert slow.path == "replay" and slow.replay_s < slow.migrate_s
    assert fast.path == "migrate" and fast.migrate_s < fast.replay_s
    assert "replay" in slow.describe() and f"{slow.bytes_remote:,}" in slow.describe()


def test_units_that_stay_on_their_node_are_a_memory_copy_and_an_unknown_node_gives_no_estimate() -> None:
    same_nodes = [PlanStage(node="a", start=0, end=3), PlanStage(node="b", start=3, end=4)]
    est = estimate_move(_problem(5 * MBIT), OLD, same_nodes, position=100)
    # l1 stays on a (copied in place); l2 moves b -> a.
    assert est.bytes_remote == 100 * KV
    assert est.migrate_s == pytest.approx(100 * KV / 625_000 + 100 * KV / LOCAL_COPY_BYTES_PER_S)
    gone = [PlanStage(node="a", start=0, end=1), PlanStage(node="z", start=1, end=4)]
    assert estimate_move(_problem(5 * MBIT), OLD, gone, position=100) is None
    assert estimate_move(_problem(5 * MBIT), OLD, NEW, position=0) is None


def _profile() -> ModelProfile:
    units = [UnitProfile(name=f"u{i}", param_bytes=1000, flops_per_token=5e6, out_bytes_per_token=4.0 * HIDDEN,
                         kv_bytes_per_token=KV) for i in range(4)]  # fmt: skip
    return ModelProfile(model="m", units=units)


def test_the_controllers_basis_keeps_only_the_routes_nodes_and_the_source() -> None:
    ids = [f"n{i}" for i in range(6)]
    nodes = [NodeView(node_id=n, state="alive", flops_per_s=1e9, memory_bytes=10**9, trusted=False, watts=1.0,
                      url=f"http://127.0.0.1:90{i}0", speeds={}, profiles={}, live={},
                      capacity={"cores": 1, "memory_bytes": 10**9}, registered_at=0.0, last_seen=0.0)
             for i, n in enumerate(ids)]  # fmt: skip
    links = [LinkView(src=s, dst=d, bandwidth_bytes_per_s=5 * MBIT, rtt_s=0.001, resolvable_bytes_per_s=None,
                      samples=1, updated_at=0.0) for s in ids for d in ids if s != d]  # fmt: skip
    cluster = cluster_from_monitor(nodes, links, None, set())
    req = plan_request(_profile(), cluster, QosPolicy(), None)
    basis = move_basis(req, None, {"n2", "n3"})
    assert set(basis.node_ids) == {"n2", "n3", req.source}
    old = [PlanStage(node="n2", start=0, end=4)]
    new = [PlanStage(node="n2", start=0, end=2), PlanStage(node="n3", start=2, end=4)]
    est = estimate_move(basis, old, new, position=10)
    assert est.bytes_remote == 2 * 10 * KV
    assert est.migrate_s == pytest.approx(
        2 * 10 * KV / (5 * MBIT) + 0.001 + 2 * 10 * KV / LOCAL_COPY_BYTES_PER_S
    )
