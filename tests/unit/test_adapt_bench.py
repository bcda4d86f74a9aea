"""The adaptation benchmark's pure parts: scenario/timeline parsing, phases, statistics, report."""

from __future__ import annotations

import math

import pytest

from bench.adapt_markdown import markdown, transition_text
from bench.adapt_scenario import load_adapt_scenario, parse_adapt_scenario, resolve_node, scenario_names
from bench.adapt_stats import (
    choose_slo,
    first_change_comparison,
    percentile,
    phases,
    recovery_s,
    strategy_rows,
    transition,
)
from edgeorch.local.scenario import ScenarioError

BASE = {"duration_s": 40, "workers": [{"id": "n1", "memory": "360MB"}, {"id": "n2", "memory": "360MB"}]}


def scenario(*events, **extra):
    return parse_adapt_scenario({**BASE, **extra, "timeline": list(events)}, "t")


def test_every_shipped_scenario_parses_and_forces_a_split() -> None:
    assert {"node_slowdown", "link_degradation", "node_loss", "node_join", "busy_edge_site"} <= set(
        scenario_names()
    )
    for name in scenario_names():
        s = load_adapt_scenario(name)
        assert s.name == name and s.timeline
        # SmolLM2 with the KV cache of the default workload needs ~745 MB in fp32 and
        # ~258 MB in int8 (the orchestrator's profile): no node may hold it alone at the start.
        need = {"fp32": 745e6, "int8": 258e6}.get(s.weight_format)
        assert need, f"{name}: add the memory SmolLM2 needs in {s.weight_format} here"
        assert all(w.memory_bytes is not None and w.memory_bytes < need for w in s.cluster.workers), name


def test_events_are_validated_by_kind() -> None:
    s = scenario({"at_s": 10, "kind": "slowdown", "node": "@busiest", "factor": 4},
                 {"at_s": 20, "kind": "join", "spec": {"id": "n9", "memory": "1GB", "slowdown": 1.0}},
                 {"at_s": 30, "kind": "load", "sessions": 3})  # fmt: skip
    assert [e.label() for e in s.timeline] == ["slowdown ×4 @busiest", "join n9", "load 3 sessions"]
    assert s.timeline[1].spec.memory_bytes == 10**9 and s.max_sessions() == 3
    bad = [
        {"at_s": 10, "kind": "slowdown", "node": "n1"},  # no factor
        {"at_s": 10, "kind": "link", "node": "n1"},  # neither bandwidth nor RTT
        {"at_s": 10, "kind": "kill", "node": "@nowhere"},  # unknown role
        {"at_s": 10, "kind": "kill", "node": "n1", "factor": 2},  # a field the kind does not take
        {"at_s": 10, "kind": "join", "spec": {"id": "n1"}},  # a node id already taken
        {"at_s": 50, "kind": "kill", "node": "n1"},  # after the end
        {"at_s": 1, "kind": "kill", "node": "n1"},  # inside the warm-up
        {"at_s": 10, "kind": "explode", "node": "n1"},
    ]
    for event in bad:
        with pytest.raises(ScenarioError):
            scenario(event)
    with pytest.raises(ScenarioError, match="time order"):
        scenario({"at_s": 20, "kind": "kill", "node": "n1"}, {"at_s": 10, "kind": "kill", "node": "n2"})
    with pytest.raises(ScenarioError, match="workers"):
        parse_adapt_scenario({"duration_s": 5, "timeline": []}, "t")


def test_scaling_stretches_the_timeline_but_not_the_warmup() -> None:
    s = scenario({"at_s": 15, "kind": "kill", "node": "n1"}).scaled(0.5, sessions=4)
    assert (s.timeline[0].at_s, s.duration_s, s.warmup_s, s.sessions) == (7.5, 20, 3, 4)
    with pytest.raises(ScenarioError):
        scenario({"at_s": 4, "kind": "kill", "node": "n1"}).scaled(0.5)  # the event would fall in the warm-up


def test_roles_resolve_on_the_current_plan() -> None:
    stages = [{"node": "n1", "start": 0, "end": 12}, {"node": "n2", "start": 12, "end": 28},
              {"node": "n3", "start": 28, "end": 32}]  # fmt: skip
    running = ["n1", "n2", "n3", "n4"]
    assert resolve_node("@busiest", stages, running) == "n2"
    assert [resolve_node(r, stages, running) for r in ("@first", "@middle", "@last")] == ["n1", "n2", "n3"]
    assert resolve_node("@spare", stages, running) == "n4"
    assert resolve_node("@spare", stages, running[:3]) is None
    assert resolve_node("n4", stages, running) == "n4" and resolve_node("n9", stages, running) is None
    assert resolve_node("@first", [], running) is None


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile(list(range(1, 21)), 0.95) == pytest.approx(19.05)


def req(start, end, ok=True, tokens=24):
    return {"start_s": start, "end_s": end, "latency_s": end - start, "ok": ok, "tokens": tokens if ok else 0}


def test_phases_assign_requests_by_end_and_measure_recovery() -> None:
    assert [p.name for p in phases([10.0], ["x"], 3.0, 40.0)] == ["before", "after"]
    assert [p.name for p in phases([10.0, 20.0], ["a", "b"], 3.0, 40.0)] == ["before", "after a", "after b"]
    # 1 s requests before the change at 10 s, a 5 s one across it, slow 4 s ones, then 1 s again from 25 s.
    reqs = [req(0.5, 1.5)] + [req(t, t + 1.0) for t in range(3, 9)] + [req(9, 14)]
    reqs += [req(14, 18), req(18, 22), req(22, 25), req(25, 26), req(26, 27), req(27, 28, ok=False)]
    reqs += [req(28.5, 29.5), req(29.5, 30.5), req(30.5, 31.5)]
    run = {
        "requests": reqs,
        "plan_changes": [{"t_s": 12.0, "kind": "resplit"}, {"t_s": -1.0, "kind": "deploy"}],
    }
    before, after = strategy_rows(run, [10.0], ["x"], 3.0, 32.0, slo_s=1.5)
    assert (before["requests"], before["failed"], before["p50_s"], before["replans"]) == (6, 0, 1.0, 0)
    assert before["slo_attainment"] == 1.0 and before["tokens_per_s"] == pytest.approx(6 * 24 / 7)
    assert (after["requests"], after["failed"], after["replans"]) == (10, 1, 1)  # the 9-14 s one included
    assert after["slo_attainment"] == pytest.approx(5 / 10) and after["replanned_after_s"] == 2.0
    # Among requests started after 10 s, by end: 4, 4, 3, 1, 1 s: the window (3, 1, 1) ending at 27 s has
    # median 1.0; the failure after it does not undo that.
    assert after["recovered_s"] == pytest.approx(17.0) and after["reference_p50_s"] == 1.0
    assert recovery_s(reqs, 10.0, 1.0, until_s=26.5) is None  # not within the interval
    assert recovery_s(reqs, 10.0, None) is None
    assert recovery_s([req(11, 12, ok=False)] * 3, 10.0, 1.0) is None
    assert math.isclose(recovery_s(reqs, 0.0, 1.0), 5.0)  # the third request after 0 s ends at 5 s


def test_slo_comes_from_adaptive_before_the_change_and_comparison_reads_the_table() -> None:
    fast = {"requests": [req(t, t + 2.0) for t in range(3, 9)], "plan_changes": []}
    runs = {"static": {"requests": [req(4, 5)], "plan_changes": []}, "adaptive": fast}
    assert choose_slo(runs, [10.0], 3.0) == (3.0, "adaptive")
    runs["adaptive"] = {"infeasible": True, "reason": "no plan"}
    assert choose_slo(runs, [10.0], 3.0) == (1.5, "static")
    table = {"adaptive": [{}, {"p95_s": 2.0, "failed": 0, "requests": 9}],
             "static": [{}, {"p95_s": 5.0, "failed": 2, "requests": 4}]}  # fmt: skip
    assert first_change_comparison(table) == {"static_over_adaptive_p95": 2.5, "adaptive_failed": 0,
                                              "static_failed": 2, "adaptive_served": 9, "static_served": 2}  # fmt: skip
    assert first_change_comparison({"adaptive": table["adaptive"]}) is None
    # Static ran on a 25 % slower machine: its p95 of 5 s is 2 s of its own p50, adaptive's 2 s is 1.25 of its 1.6 s.
    table["adaptive"][0], table["static"][0] = {"p50_s": 1.6}, {"p50_s": 2.0}
    assert first_change_comparison(table)["drift_corrected_ratio"] == pytest.approx(2.0)
    # Over the requests started after the change (10 s): the one in flight at it is left out.
    runs = {"adaptive": {"requests": [req(9, 16), req(11, 13), req(13, 15)]},
            "static": {"requests": [req(9, 16), req(11, 17), req(17, 23)]}}  # fmt: skip
    settled = first_change_comparison(table, runs, (10.0, 30.0))
    assert settled["adaptive_settled_p95_s"] == 2.0 and settled["static_over_adaptive_settled_p95"] == 3.0


def test_the_markdown_report_has_a_row_per_phase_and_says_infeasible(tmp_path) -> None:
    from bench.adapt import summarise
    from bench.adapt_plot import plot_latency

    s = scenario({"at_s": 10, "kind": "slowdown", "node": "@busiest", "factor": 4})
    reqs = [{**req(t, t + 1.0), "text": "a", "version": 1, "status": 200} for t in range(3, 30, 2)]
    changes = [
        {"t_s": 12.0, "kind": "resplit", "version": 2, "stages": [{"node": "n1", "start": 0, "end": 32}]}
    ]
    timeline = [{"t_s": 10.0, "label": "slowdown ×4 @busiest", "node": "n1", "ok": True}]
    runs = {"adaptive": {"policy": {}, "requests": reqs, "plan_changes": changes, "timeline": timeline},
            "even": {"policy": {"strategy": "even"}, "infeasible": True, "reason": "nodes short of memory"}}  # fmt: skip
    machine = {"nproc": 2, "cpu": "x", "date": "now", "loadavg_start": 1.0}
    result = summarise(s, runs, machine, "p.png")
    md = markdown(result)
    assert "| adaptive | before | 3 | 0 | 1.00 |" in md and "| adaptive | after |" in md
    assert "| even | infeasible: nodes short of memory" in md
    plot_latency(result, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_repeated_rounds_pair_each_strategys_kth_run_and_judge_the_median() -> None:
    from bench.adapt import summarise

    s = scenario({"at_s": 10, "kind": "slowdown", "node": "@busiest", "factor": 4}, name="node_slowdown")

    def run(after_s: float) -> dict:
        reqs = [{**req(t, t + 1.0), "text": "a", "version": 1, "status": 200} for t in range(3, 9)]
        reqs += [{**req(t, t + after_s), "text": "a", "version": 1, "status": 200} for t in range(11, 30, 3)]
        return {"policy": {}, "requests": reqs, "plan_changes": [], "timeline": [], "network": "netns"}

    # static's after-phase requests take 3 s throughout; adaptive's 1, 2 and 1.2 s in the three rounds.
    runs = {"adaptive": run(1.0), "static": run(3.0)}
    repeats = {"adaptive": [run(2.0), run(1.2)], "static": [run(3.0), run(3.0)]}
    machine = {"nproc": 2, "cpu": "x", "date": "now", "loadavg_start": 1.0}
    result = summarise(s, runs, machine, None, repeats)
    summary = result["rounds_summary"]
    assert summary["rounds"] == 3
    assert summary["ratios"] == pytest.approx([3.0, 1.5, 2.5])
    assert summary["median_ratio"] == pytest.approx(2.5) and summary["adaptive_failed"] == 0
    md = markdown(result)
    assert "Over 3 rounds" in md and "median 2.50" in md
    assert "Target on the medians (≥ 2× lower p95, zero failures): **met** over the phase" in md
    assert "Links: a network namespace per worker" in md
    # A round whose static run failed to start counts as no comparison, not as a ratio.
    repeats["static"][1] = {"policy": {}, "infeasible": True, "run_failed": True, "reason": "x"}
    assert summarise(s, runs, machine, None, repeats)["rounds_summary"]["ratios"] == pytest.approx([3.0, 1.5])
    assert "repeats" not in summarise(s, runs, machine, None, {})


def test_transition_reads_seen_confirmed_and_committed_off_the_decision_log() -> None:
    def ev(t_s, kind, message, **data):
        return {"t_s": t_s, "kind": kind, "message": message, "data": data}

    waiting = "monitor: link: latency 3 s -> 1 s (-60.0%); waiting 1.0s to see the gain again"
    run = {"events": [
        ev(5.0, "remap", "v2 committed: earlier change"),
        ev(11.2, "keep", "timer: the current plan is still the best"),
        ev(21.3, "keep", waiting),
        ev(24.1, "resplit", "v3 committed: confirming a candidate: ...; confirmed: the gain was predicted "
                            "again 1s later", took_s=1.5),
        ev(30.0, "remap", "v4 committed: a later one"),
    ]}  # fmt: skip
    step = transition(run, 20.0, 40.0)
    assert step == pytest.approx({"seen_s": 1.3, "rollout_s": 2.6, "committed_s": 4.1, "rollout_took_s": 1.5,
                                  "confirmed_by": "second look", "kind": "resplit"})  # fmt: skip
    # Confirmed by the plan's own slowed steps on the first look that saw the gain: no waiting look.
    del run["events"][2]
    run["events"][2] = ev(22.6, "remap", "v3 committed: monitor: ...; confirmed by measurement: decode steps "
                                         "2.61x their earlier median", took_s=1.2)  # fmt: skip
    step = transition(run, 20.0, 40.0)
    assert step == pytest.approx({"seen_s": 1.4, "rollout_s": 1.4, "committed_s": 2.6, "rollout_took_s": 1.2,
                                  "confirmed_by": "measurement", "kind": "remap"})  # fmt: skip
    assert "confirmed by measurement" in transition_text(step)
    assert transition(run, 31.0, 40.0) is None and transition({}, 0.0, 40.0) is None
