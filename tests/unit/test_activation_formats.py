"""Choosing an activation format per hop (issue 21): the cost model's bytes and conversion by hand,
int8 on a slow link and fp32 on a fast one, the quality budget, compression switched off, and the
controller's reformat decision on plain records."""

from __future__ import annotations

import pytest

from edgeorch.orchestration.decide import decide, quality_loss, reformat_candidate
from edgeorch.orchestration.snapshot import cluster_from_monitor, plan_request, predict, with_formats
from edgeorch.planning import Stage, Workload, build_problem, evaluate
from edgeorch.planning.cost import plan_formats
from edgeorch.planning.formats import (
    CONVERT_S_PER_ELEMENT,
    TOP1_LOSS_PER_HOP,
    HopLink,
    bytes_per_token,
    choose_hop_formats,
)
from edgeorch.rollout.plan import desired_for_node, place
from edgeorch.schemas.monitor import LinkView, NodeView
from edgeorch.schemas.orchestrator import QosPolicy
from edgeorch.schemas.plan import PlanStage
from edgeorch.schemas.profile import ModelProfile, UnitProfile
from edgeorch.schemas.rollout import Plan

HIDDEN = 576  # SmolLM2's hidden size: 2,304 fp32 bytes per token
MBIT = 1e6 / 8


def _problem(bandwidth: float, tokens=(400, 8)) -> object:
    """Three nodes, four units of 5 MFLOP per token each at 1 GFLOP/s, every link at ``bandwidth``, no RTT."""
    ids = ["a", "b", "c"]
    links = [(s, d, bandwidth, 0.0) for s in ids for d in ids if s != d]
    return build_problem(
        unit_names=["embed", "l1", "l2", "head"], param_bytes=[1, 1, 1, 1], flops_per_token=[5e6] * 4,
        out_bytes_per_token=[4.0 * HIDDEN] * 3 + [4.0], kv_bytes_per_token=[0.0] * 4, node_ids=ids,
        memory_bytes=[10] * 3, flops_per_s=[1e9] * 3, trusted=[False] * 3, watts=[1.0] * 3, links=links,
        source="a", workload=Workload(prompt_tokens=tokens[0], generated_tokens=tokens[1]),
    )  # fmt: skip


PLAN = [Stage(0, 0, 2), Stage(1, 2, 3), Stage(2, 3, 4)]  # hops into units 2 (a->b) and 3 (b->c)


def test_the_cost_model_charges_each_formats_bytes_and_conversion_by_hand() -> None:
    p = _problem(5 * MBIT, tokens=(100, 0))
    fp32 = evaluate(p, PLAN)
    int8 = evaluate(p, PLAN, {2: "int8", 3: "bf16"})
    hop = {h.boundary: h for h in int8.hops}
    assert hop[2].format == "int8" and hop[2].bytes_per_token == HIDDEN + 4 + 64
    # 100 tokens x (644 B / 625,000 B/s + 576 elements x 100 ns)
    assert hop[2].transfer_s == pytest.approx(100 * (644 / 625_000 + HIDDEN * CONVERT_S_PER_ELEMENT["int8"]))
    assert hop[3].transfer_s == pytest.approx(100 * (2 * HIDDEN / 625_000 + HIDDEN * 1e-9))
    assert {h.boundary: h.transfer_s for h in fp32.hops}[2] == pytest.approx(100 * 4 * HIDDEN / 625_000)
    assert fp32.latency_s - int8.latency_s == pytest.approx(
        sum(h.transfer_s for h in fp32.hops) - sum(h.transfer_s for h in int8.hops)
    )
    # The entry and exit hops carry token ids: a format never touches them.
    assert [h.format for h in int8.hops if h.boundary in (0, 4)] == ["fp32"] * len(
        [h for h in int8.hops if h.boundary in (0, 4)]
    )


def test_a_slow_link_gets_int8_and_a_fast_one_keeps_fp32() -> None:
    assert plan_formats(_problem(5 * MBIT), PLAN) == {2: "int8", 3: "int8"}
    # 1 Gbit/s: int8 costs more in conversion than it saves in bytes, and bf16's ~4 ms per hop
    # is far below 5 % of the ~8 s request.
    assert plan_formats(_problem(1000 * MBIT), PLAN) == {2: "fp32", 3: "fp32"}
    # Without int8 the slow link takes bf16, the next best.
    assert plan_formats(_problem(5 * MBIT), PLAN, allowed=("fp32", "bf16")) == {2: "bf16", 3: "bf16"}


def test_compression_switched_off_or_a_zero_budget_keeps_every_hop_exact() -> None:
    slow = _problem(5 * MBIT)
    assert plan_formats(slow, PLAN, allowed=("fp32",)) == {2: "fp32", 3: "fp32"}
    assert plan_formats(slow, PLAN, quality_budget=0.0) == {2: "fp32", 3: "fp32"}


def test_the_budget_goes_to_the_hops_that_save_the_most() -> None:
    hops = [HopLink(2, HIDDEN, 20 * MBIT), HopLink(3, HIDDEN, 5 * MBIT)]
    budget = TOP1_LOSS_PER_HOP["int8"] * 1.5  # one int8 hop, or one int8 and one bf16
    chosen = choose_hop_formats(hops, 408, latency_s=1.0, quality_budget=budget)
    assert chosen == {3: "int8", 2: "fp32"} or chosen == {3: "int8", 2: "bf16"}
    assert sum(TOP1_LOSS_PER_HOP[f] for f in chosen.values()) <= budget
    assert chosen[3] == "int8"  # the slower link saves more seconds: it is served first
    # A saving below min_gain of the latency is not worth any quality.
    assert choose_hop_formats(hops, 408, latency_s=1e6) == {2: "fp32", 3: "fp32"}
    assert bytes_per_token("int8", HIDDEN) < bytes_per_token("bf16", HIDDEN) < bytes_per_token("fp32", HIDDEN)


# ----- the controller's side: monitor records in, formats on the plan's stages out -----------------


def _node(nid: str) -> NodeView:
    return NodeView(node_id=nid, state="alive", flops_per_s=1e9, memory_bytes=10**9, trusted=False, watts=1.0,
                    url=f"http://127.0.0.1:90{ord(nid[0]) % 10}0", speeds={}, profiles={}, live={},
                    capacity={"cores": 1, "memory_bytes": 10**9}, registered_at=0.0, last_seen=0.0)  # fmt: skip


def _request(bandwidth: float, policy: QosPolicy, current=None):
    units = [UnitProfile(name="embed", param_bytes=1, flops_per_token=1e6, out_bytes_per_token=4 * HIDDEN,
                         kv_bytes_per_token=0)]  # fmt: skip
    units += [UnitProfile(name=f"l{i}", param_bytes=1, flops_per_token=1e6, out_bytes_per_token=4 * HIDDEN,
                          kv_bytes_per_token=0) for i in range(2)]  # fmt: skip
    units.append(UnitProfile(name="head", param_bytes=1, flops_per_token=1e6, out_bytes_per_token=4,
                             kv_bytes_per_token=0))  # fmt: skip
    links = [LinkView(src=s, dst=d, bandwidth_bytes_per_s=bandwidth, rtt_s=0.0, resolvable_bytes_per_s=None,
                      samples=1, updated_at=0.0) for s in "abc" for d in "abc" if s != d]  # fmt: skip
    cluster = cluster_from_monitor([_node(n) for n in "abc"], links, None, set())
    return plan_request(ModelProfile(model="m", units=units), cluster, policy, current)


STAGES = [PlanStage(node="a", start=0, end=2), PlanStage(node="b", start=2, end=3),
          PlanStage(node="c", start=3, end=4)]  # fmt: skip
PREFILL = QosPolicy(workload={"prompt_tokens": 400, "generated_tokens": 8}, cooldown_s=0)


def test_the_controller_puts_int8_on_the_stages_before_slow_hops_and_never_on_the_last() -> None:
    slow = with_formats(_request(5 * MBIT, PREFILL), STAGES, PREFILL)
    assert [s.activation_format for s in slow] == ["int8", "int8", "fp32"]
    fast = with_formats(_request(1000 * MBIT, PREFILL), STAGES, PREFILL)
    assert [s.activation_format for s in fast] == ["fp32"] * 3
    off = PREFILL.model_copy(update={"activation_formats": ["fp32"]})
    assert [s.activation_format for s in with_formats(_request(5 * MBIT, off), STAGES, off)] == ["fp32"] * 3
    # predict charges each stage's format: the int8 plan is predicted faster on the slow links.
    req = _request(5 * MBIT, PREFILL)
    # 4 units of 1 MFLOP per token at 1 GFLOP/s, 408 tokens, plus the exit hop's token ids (c -> a)
    compute = 408 * 4e6 / 1e9 + 408 * 4 / (5 * MBIT)
    assert predict(req, STAGES).latency_s == pytest.approx(compute + 2 * 408 * 4 * HIDDEN / (5 * MBIT))
    assert predict(req, slow).latency_s == pytest.approx(
        compute + 2 * 408 * ((HIDDEN + 68) / (5 * MBIT) + HIDDEN * CONVERT_S_PER_ELEMENT["int8"])
    )
    assert quality_loss(slow) == pytest.approx(2 * TOP1_LOSS_PER_HOP["int8"])


def test_a_reformat_is_proposed_on_slow_links_and_back_to_fp32_when_they_recover() -> None:
    slow_req = _request(5 * MBIT, PREFILL, STAGES)
    found = reformat_candidate(slow_req, STAGES, PREFILL, "keep", None)
    assert found is not None and [s.activation_format for s in found[0]] == ["int8", "int8", "fp32"]
    d = decide(revision_kind="reformat", current_feasible=True, current=predict(slow_req, STAGES),
               candidate=found[1], policy=PREFILL, now=100.0, last_change_at=0.0, trigger="t")  # fmt: skip
    assert d.change and d.kind == "reformat" and d.gain > 0.3
    # The links recover: fp32 is chosen again, predicted no faster, but exact answers need no gain.
    compressed = found[0]
    fast_req = _request(1000 * MBIT, PREFILL, compressed)
    back = reformat_candidate(fast_req, compressed, PREFILL, "keep", None)
    assert back is not None and [s.activation_format for s in back[0]] == ["fp32"] * 3
    d = decide(revision_kind="reformat", current_feasible=True, current=predict(fast_req, compressed),
               candidate=back[1], policy=PREFILL, now=100.0, last_change_at=0.0, trigger="t",
               less_lossy=quality_loss(back[0]) < quality_loss(compressed))  # fmt: skip
    assert d.change and "exact" in d.reason
    # Nothing to change when the formats already fit the links.
    assert reformat_candidate(slow_req, compressed, PREFILL, "keep", None) is None


def test_the_chosen_format_reaches_each_workers_desired_state_and_is_left_out_when_fp32() -> None:
    stages = [s.model_copy(update={"url": f"http://127.0.0.1:700{i}"}) for i, s in enumerate(STAGES)]
    stages[0] = stages[0].model_copy(update={"activation_format": "int8"})
    plan = Plan(model="m", stages=stages)
    placed = place("dep", 3, plan)
    assert [p.activation_format for p in placed] == ["int8", "fp32", "fp32"]
    assert (
        "activation_format" not in stages[1].model_dump()
        and stages[0].model_dump()["activation_format"] == "int8"
    )
    assert Plan.model_validate_json(plan.model_dump_json()).stages[0].activation_format == "int8"
    from edgeorch.rollout.plan import DeploymentSnapshot

    snap = DeploymentSnapshot(name="dep", active_version=3, plans={3: plan})
    (entry,) = desired_for_node("a", [snap])
    assert entry["stages"][0]["activation_format"] == "int8"


def test_a_compressed_hop_stays_compressed_until_it_saves_less_than_half_the_threshold() -> None:
    hop = [HopLink(2, HIDDEN, 5 * MBIT)]
    saving = 408 * (
        4 * HIDDEN / (5 * MBIT) - (HIDDEN + 68) / (5 * MBIT) - HIDDEN * CONVERT_S_PER_ELEMENT["int8"]
    )
    latency = saving / 0.015  # the hop saves 1.5 % of the request: under 2 %, over 1 %
    assert choose_hop_formats(hop, 408, latency) == {2: "fp32"}
    assert choose_hop_formats(hop, 408, latency, current={2: "int8"}) == {2: "int8"}
    assert choose_hop_formats(hop, 408, saving / 0.008, current={2: "int8"}) == {2: "fp32"}


def test_a_reformat_toward_compression_needs_compress_min_gain_not_min_gain() -> None:
    from edgeorch.schemas.orchestrator import PredictedView

    def pred(latency_s: float) -> PredictedView:
        return PredictedView(latency_s=latency_s, throughput_tokens_per_s=1.0, energy_j=1.0, step_s=0.1)

    args = dict(current_feasible=True, current=pred(10.0), candidate=pred(8.5), policy=PREFILL, now=100.0,
                last_change_at=0.0, trigger="t")  # fmt: skip
    assert decide(revision_kind="reformat", **args).change  # 15 % >= compress_min_gain 5 %
    assert not decide(revision_kind="resplit", **args).change  # 15 % < min_gain 30 %
    strict = PREFILL.model_copy(update={"compress_min_gain": 0.2})
    assert not decide(revision_kind="reformat", **{**args, "policy": strict}).change


def test_predictions_charge_the_prompt_at_the_measured_prefill_speed() -> None:
    req = _request(1000 * MBIT, PREFILL)
    plain, fast_prefill = predict(req, STAGES), predict(req, STAGES, {"a": 1e10, "b": 1e10, "c": 1e10})
    # 4 units of 1 MFLOP: 400 prompt tokens at 10 GFLOP/s instead of 1, 8 generated at 1 GFLOP/s
    assert plain.latency_s - fast_prefill.latency_s == pytest.approx(400 * 4e6 / 1e9 - 400 * 4e6 / 1e10)
    assert plain.step_s == fast_prefill.step_s  # a decode step is at the decode speed either way
