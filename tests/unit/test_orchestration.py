"""The orchestrator's pure parts: monitor records to plan requests, the keep/change decision,
failure classification, and text streaming with stop strings."""

from __future__ import annotations

import pytest

from edgeorch.orchestration.decide import decide, measured_slowdown, unverified_hops
from edgeorch.orchestration.generation import Route, _classify
from edgeorch.orchestration.snapshot import (
    UNMEASURED_BANDWIDTH_BYTES_PER_S,
    NoNodesError,
    choose_source,
    cluster_from_monitor,
    plan_request,
    predict,
    trusted_units,
)
from edgeorch.orchestration.text import TextStream
from edgeorch.planning.api import problem_from_request
from edgeorch.planning.batching import BATCH_GROWTH
from edgeorch.schemas.monitor import LinkView, NodeView
from edgeorch.schemas.orchestrator import PredictedView, QosPolicy
from edgeorch.schemas.plan import MAX_NODES, PlanStage
from edgeorch.schemas.profile import ModelProfile, UnitProfile
from edgeorch.schemas.rollout import PlacedStage
from edgeorch.transport.protocol import HopFailure


def _node(nid, flops=1e9, state="alive", trusted=False, memory=10**9) -> NodeView:
    return NodeView(node_id=nid, state=state, flops_per_s=flops, memory_bytes=memory, trusted=trusted,
                    watts=10.0, url=f"http://127.0.0.1:9{len(nid)}00", speeds={}, profiles={}, live={},
                    capacity={"cores": 1, "memory_bytes": memory}, registered_at=0.0, last_seen=0.0)  # fmt: skip


def _link(src: str, dst: str, bandwidth: float, rtt_s: float) -> LinkView:
    return LinkView(src=src, dst=dst, bandwidth_bytes_per_s=bandwidth, rtt_s=rtt_s, resolvable_bytes_per_s=None,
                    samples=1, updated_at=0.0)  # fmt: skip


def _stages(*spec: tuple[str, int, int]) -> list[PlanStage]:
    return [PlanStage(node=n, start=a, end=b) for n, a, b in spec]


def _profile(n_layers=4) -> ModelProfile:
    units = [UnitProfile(name="embed", param_bytes=1000, flops_per_token=0, out_bytes_per_token=64,
                         kv_bytes_per_token=0)]  # fmt: skip
    units += [UnitProfile(name=f"layer{i}", param_bytes=1000, flops_per_token=1e6, out_bytes_per_token=64,
                          kv_bytes_per_token=8) for i in range(n_layers)]  # fmt: skip
    units.append(UnitProfile(name="head", param_bytes=1000, flops_per_token=1e6, out_bytes_per_token=4,
                             kv_bytes_per_token=0))  # fmt: skip
    return ModelProfile(model="m", units=units)


def test_privacy_levels_name_the_units_that_need_trusted_nodes() -> None:
    assert trusted_units(QosPolicy(), 6) == []
    assert trusted_units(QosPolicy(privacy="edges"), 6) == [0, 5]
    assert trusted_units(QosPolicy(privacy="all"), 3) == [0, 1, 2]
    assert trusted_units(QosPolicy(privacy="edges", trusted_units=[2, 9]), 6) == [0, 2, 5]


def test_cluster_keeps_live_calibrated_allowed_nodes_and_fills_unmeasured_links() -> None:
    nodes = [_node("a"), _node("b"), _node("c", state="lost"), _node("d", flops=None), _node("e")]
    links = [_link("a", "b", 5e6, 0.004)]
    cl = cluster_from_monitor(nodes, links, allowed=None, exclude={"e"})
    assert [n.id for n in cl.nodes] == ["a", "b"]
    by_pair = {(lk.src, lk.dst): lk for lk in cl.links}
    # The planner is given the round trip a step pays on each hop (request and response).
    assert by_pair["a", "b"].bandwidth_bytes_per_s == 5e6 and by_pair["a", "b"].rtt_s == 0.008
    # Unmeasured pairs are not listed one by one: the request's default stands for them.
    assert ("b", "a") not in by_pair
    req = plan_request(_profile(), cl, QosPolicy(), None)
    problem = problem_from_request(req)
    b, a = problem.node_ids.index("b"), problem.node_ids.index("a")
    assert problem.has_link[b, a] and problem.bandwidth_bytes_per_s[b, a] == UNMEASURED_BANDWIDTH_BYTES_PER_S
    assert problem.rtt_s[a, b] == 0.008 and not problem.has_link[a, a]
    assert set(cl.urls) == {"a", "b"}
    assert [n.id for n in cluster_from_monitor(nodes, links, ["b"], set()).nodes] == ["b"]
    with pytest.raises(NoNodesError, match="excluded"):
        cluster_from_monitor(nodes, links, allowed=["c", "e"], exclude={"e"})


def test_a_fleet_larger_than_a_request_keeps_the_plan_in_force_trusted_and_fastest_nodes() -> None:
    # 12 nodes, room for 6: the plan's slow node stays, a quarter of the room goes to the fastest
    # trusted nodes, the rest to the fastest; the request is valid and the links follow the nodes.
    nodes = [_node(f"n{i:02d}", flops=1e9 * (i + 1), trusted=i in (0, 1, 2)) for i in range(12)]
    links = [_link("n00", "n11", 5e6, 0.004), _link("n03", "n04", 5e6, 0.004)]
    cl = cluster_from_monitor(nodes, links, None, set(), keep={"n03"}, limit=6)
    assert [n.id for n in cl.nodes] == ["n02", "n03", "n08", "n09", "n10", "n11"]
    assert set(cl.urls) == {n.id for n in cl.nodes} and cl.links == []
    assert len(cluster_from_monitor(nodes, links, None, set(), limit=12).nodes) == 12
    # At the real bound a fleet past it still yields a request the splitter accepts.
    big = [_node(f"s{i:04d}", flops=1e9 + i) for i in range(MAX_NODES + 30)]
    req = plan_request(_profile(), cluster_from_monitor(big, [], None, set()), QosPolicy(), None)
    assert len(req.nodes) == MAX_NODES and "s0000" not in {n.id for n in req.nodes}


def test_source_is_the_policys_node_else_a_trusted_one_else_the_first() -> None:
    cl = cluster_from_monitor([_node("b"), _node("a"), _node("t", trusted=True)], [], None, set())
    assert choose_source(cl, QosPolicy(source="b")) == "b"
    assert choose_source(cl, QosPolicy(source="gone")) == "t"
    cl2 = cluster_from_monitor([_node("b"), _node("a")], [], None, set())
    assert choose_source(cl2, QosPolicy()) == "a"


def test_predicted_step_is_one_token_through_the_chain_by_hand() -> None:
    links = [_link(s, d, 1e6, 0.01) for s, d in (("a", "b"), ("b", "a"))]
    cl = cluster_from_monitor([_node("a", flops=1e9), _node("b", flops=2e9)], links, None, set())
    req = plan_request(_profile(), cl, QosPolicy(source="a"), None)
    p = predict(req, _stages(("a", 0, 3), ("b", 3, 6)))
    # compute: a runs 2 layers (2e6 flops at 1e9), b runs 2 layers + head (3e6 at 2e9)
    compute = 2e6 / 1e9 + 3e6 / 2e9
    # hops: a->b carries 64 B, b->a (exit) carries 4 B; each costs the planner's rtt/2 (the measured
    # round trip, RTT_CHARGE_FACTOR) + bytes/bandwidth; entry is on a
    hops = (0.01 + 64 / 1e6) + (0.01 + 4 / 1e6)
    assert p.step_s == pytest.approx(compute + hops)
    assert p.compute_step_s == pytest.approx(compute)
    # The default policy's workload runs 4 sessions at once: each stage batches their steps, so
    # one cycle costs compute * (1 + BATCH_GROWTH * 3) + hops and yields 4 tokens.
    assert p.batch_sessions == 4
    assert p.batch_step_s == pytest.approx(compute * (1 + BATCH_GROWTH * 3) + hops)
    assert p.batch_tokens_per_s == pytest.approx(4 / p.batch_step_s)
    assert predict(req, _stages(("a", 0, 3), ("gone", 3, 6))) is None


def _pred(latency_s: float) -> PredictedView:
    return PredictedView(latency_s=latency_s, throughput_tokens_per_s=1 / latency_s, energy_j=latency_s,
                         step_s=latency_s / 10)  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "feasible", "cur", "cand", "last_change", "change", "reason"),
    [
        ("keep", True, 1.0, 1.0, None, False, "still the best"),
        ("resplit", True, 1.0, 0.9, None, False, "below the 20%"),  # 10 % gain: hysteresis
        ("resplit", True, 1.0, 0.5, 95.0, False, "cooldown"),  # 50 % but 5 s after the last change
        ("resplit", True, 1.0, 0.5, 80.0, True, "+50.0%"),
        ("remap", True, 1.0, 0.7, None, True, "+30.0%"),
        ("resplit", False, 1.0, 2.0, 99.0, True, "cannot serve"),  # node gone: at once, even if worse
    ],
)
def test_decision_has_hysteresis_and_cooldown(kind, feasible, cur, cand, last_change, change, reason) -> None:
    d = decide(revision_kind=kind, current_feasible=feasible, current=_pred(cur), candidate=_pred(cand),
               policy=QosPolicy(min_gain=0.2, cooldown_s=10), now=100.0, last_change_at=last_change,
               trigger="t")  # fmt: skip
    assert d.change is change
    assert reason in d.reason


def test_a_measured_slowdown_lifts_the_cooldown_but_not_the_hysteresis() -> None:
    args = dict(revision_kind="resplit", current_feasible=True, current=_pred(1.0),
                policy=QosPolicy(min_gain=0.3, cooldown_s=10), now=100.0, last_change_at=95.0, trigger="t")  # fmt: skip
    assert not decide(candidate=_pred(0.5), **args).change  # in cooldown
    d = decide(candidate=_pred(0.5), slowed=2.4, **args)
    assert d.change and "5.0s of cooldown skipped: decode steps 2.40x" in d.reason
    assert not decide(candidate=_pred(0.8), slowed=2.4, **args).change  # 20 %: below the hysteresis


def test_throughput_gain_is_measured_on_seconds_per_token() -> None:
    slow = PredictedView(latency_s=1, throughput_tokens_per_s=10, energy_j=1, step_s=0.1)
    fast = PredictedView(latency_s=1, throughput_tokens_per_s=20, energy_j=1, step_s=0.1)
    d = decide(revision_kind="resplit", current_feasible=True, current=slow, candidate=fast,
               policy=QosPolicy(objective="throughput"), now=0, last_change_at=None, trigger="t")  # fmt: skip
    assert d.change and d.gain == pytest.approx(0.5)


def test_measured_slowdown_compares_a_versions_last_steps_with_its_earlier_ones() -> None:
    # 40 steps of 100 ms on version 3, one every 0.1 s up to t = 4.0, then 250 ms steps.
    steps = [(0.1 * i, 3, 0.100) for i in range(1, 41)]
    assert measured_slowdown(steps, 3, now=4.0) == pytest.approx(1.0)
    slow = [*steps, *((4.0 + 0.25 * i, 3, 0.250) for i in range(1, 7))]
    assert measured_slowdown(slow, 3, now=5.5) == pytest.approx(2.5)
    # Steps of another version (the previous plan, sessions still moving) do not count.
    assert measured_slowdown([*steps, *((4.0 + 0.02 * i, 2, 0.9) for i in range(5))], 3, now=4.1) == 1.0
    # One slow step among fast ones (a GC pause, a busy neighbour) is not a slowdown.
    spike = [*steps, (4.05, 3, 0.4), (4.1, 3, 0.1), (4.2, 3, 0.1), (4.3, 3, 0.1)]
    assert measured_slowdown(spike, 3, now=4.3) == pytest.approx(1.0)
    # Too few steps on either side: no reading rather than a guess.
    assert measured_slowdown(slow[-10:], 3, now=5.5) is None
    assert measured_slowdown(steps, 3, now=9.0) is None
    assert measured_slowdown(steps, 4, now=4.0) is None


def test_failures_are_read_from_their_fields_not_their_message() -> None:
    stages = tuple(PlacedStage(stage_id=f"d.v1.s{i}", node=n, url=f"http://127.0.0.1:810{i}", model="m",
                               start=i, end=i + 1, next=None) for i, n in enumerate("abc"))  # fmt: skip
    route = Route("d", 1, stages)
    assert (route.entry_url, route.entry_stage) == ("http://127.0.0.1:8100", "d.v1.s0")
    # A stage knows its next hop's stage id, not its node: the route names the node.
    dead = _classify(route, HopFailure(502, "whatever words", "unreachable", "d.v1.s2"))
    assert dead.failed_node == "c" and dead.replayable
    late = _classify(route, HopFailure(502, "", "timeout", "d.v1.s1", failed_node="b"))
    assert late.failed_node == "b" and late.replayable
    # Text that reads like a dead hop decides nothing: only the kind does.
    worded = "next hop 'd.v1.s2' at http://127.0.0.1:8102/v1/stages/d.v1.s2/forward unreachable: ConnectError"
    assert not _classify(route, HopFailure(502, worded, "error", "d.v1.s1")).replayable
    for kind in ("stage_missing", "session_missing", "position"):
        stale = _classify(route, HopFailure(404, "", kind, "d.v1.s0", "a"))
        assert stale.failed_node is None and stale.replayable
    assert not _classify(route, HopFailure(503, "KV cache full", "cache_full", "d.v1.s1", "b")).replayable


class _CharTokenizer:
    """One token per character, decoded by joining: enough to test the stream logic."""

    def __init__(self, text: str):
        self.text = text

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(self.text[i] for i in ids)


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("hello world", [], "hello world"),
        ("hello world", ["wor"], "hello "),
        ("hello world", ["xyz"], "hello world"),
        ("ab\n\ncd", ["\n\n"], "ab"),
        ("aaab", ["ab"], "aa"),
    ],
)
def test_text_stream_deltas_add_up_and_never_leak_a_stop_string(text, stop, expected) -> None:
    ts = TextStream(_CharTokenizer(text), stop)
    out = ""
    for i in range(len(text)):
        delta = ts.push(i)
        out += delta
        assert not any(s and s in out for s in stop)
        if ts.stopped:
            break
    out += ts.finish()
    assert out == expected


def test_more_sessions_of_the_deployments_own_are_not_a_slowdown_but_a_slower_node_under_them_is() -> None:
    # One session: 100 ms steps to t = 4.0. Then 8 sessions: each step 170 ms (they share the chain).
    solo = [(0.1 * i, 3, 0.100, 1) for i in range(1, 41)]
    loaded = [*solo, *((4.0 + 0.02 * i, 3, 0.170, 8) for i in range(1, 80))]
    # The load just rose: no earlier steps under 8 sessions, so no reading (the old bug read 1.7x).
    assert measured_slowdown(loaded, 3, now=5.6) is None
    # Minutes of steady 8-session load: 1.0, whatever the solo steps were.
    steady = [(0.02 * i, 3, 0.170, 8 - i % 2) for i in range(1, 600)]
    assert measured_slowdown(steady, 3, now=12.0) == pytest.approx(1.0)
    # A node 4x slower under the same load: caught.
    slowed = [*steady, *((12.6 + 0.1 * i, 3, 0.680, 8) for i in range(1, 14))]
    assert measured_slowdown(slowed, 3, now=13.9) == pytest.approx(4.0)
    # Steps without a load (older callers) count as one session.
    assert measured_slowdown([(t, v, s) for t, v, s, _ in solo], 3, now=4.0) == pytest.approx(1.0)


def test_a_move_waits_for_fresh_figures_of_the_new_hops_it_would_use() -> None:
    def plan(*nodes: str) -> list[PlanStage]:
        return [PlanStage(node=n, start=i, end=i + 1) for i, n in enumerate(nodes)]

    current = plan("a", "b", "c")
    provisional = {("b", "c"), ("c", "d"), ("d", "b"), ("a", "d")}
    # a->b and b->c carry the current plan's traffic; c->d and d->b would be new hops on stale figures.
    assert unverified_hops(current, plan("a", "b", "c", "d", "b"), provisional) == [("c", "d"), ("d", "b")]
    assert (
        unverified_hops(current, plan("a", "a", "b", "c"), provisional) == []
    )  # same-node hops need no link
    assert unverified_hops(current, plan("a", "d", "d"), provisional) == [("a", "d")]
    assert unverified_hops(current, plan("a", "d", "d"), set()) == []
