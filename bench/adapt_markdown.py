"""The adaptation benchmark's report: one Markdown page per scenario from its results.

Text only: every figure comes from :mod:`bench.adapt_stats` (or the results
dict built from it), so a report can be rebuilt from a JSON file.
"""

from __future__ import annotations

from bench.adapt_compression import compression_lines
from bench.adapt_stats import SLO_FACTOR


def _s(value: float | None, fmt: str = ".2f") -> str:
    return "—" if value is None else format(value, fmt)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f} %"


def _recovered(row: dict) -> str:
    if "recovered_s" not in row:
        return ""
    if row.get("reference_p50_s") is None:
        return "— (no reference)"
    return "never" if row["recovered_s"] is None else f"{row['recovered_s']:.1f} s"


def _replanned(row: dict) -> str:
    if "replanned_after_s" not in row:
        return ""
    return "—" if row["replanned_after_s"] is None else f"{row['replanned_after_s']:.1f} s"


def table_lines(table: dict[str, list[dict]], runs: dict[str, dict]) -> list[str]:
    """The per-strategy, per-phase table (an infeasible strategy is one row saying so)."""
    lines = ["| strategy | phase | requests | failed | p50 s | p50 ÷ before | p95 s | tokens/s | SLO met "
             "| re-plans | first re-plan after | recovered after |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for name, run in runs.items():
        if run.get("infeasible"):
            what = "not measured" if run.get("run_failed") else "infeasible"
            lines.append(f"| {name} | {what}: {run['reason'][:160]} | | | | | | | | | | |")
            continue
        for row in table[name]:
            lines.append(f"| {name} | {row['phase']} | {row['requests']} | {row['failed']} | {_s(row['p50_s'])} "
                         f"| {_s(row.get('p50_vs_before'))} | {_s(row['p95_s'])} | {_s(row['tokens_per_s'], '.1f')} "
                         f"| {_pct(row['slo_attainment'])} | {row['replans']} | {_replanned(row)} | {_recovered(row)} |")  # fmt: skip
    return lines


def _plan_text(stages: list[dict]) -> str:
    """``n1[0:11] →int8 n2[11:21] → n3[21:32]``: each hop's activation format where it is not fp32."""
    text = ""
    for i, s in enumerate(stages):
        if i:
            fmt = stages[i - 1].get("activation_format", "fp32")
            text += " → " if fmt == "fp32" else f" →{fmt} "
        text += f"{s['node']}[{s['start']}:{s['end']}]"
    return text or "(none)"


def plan_lines(runs: dict[str, dict]) -> list[str]:
    """Each strategy's plans over time and where each timeline event landed."""
    lines = []
    for name, run in runs.items():
        if run.get("infeasible"):
            continue
        code = f" (run {run['started']}, code {run['commit']})" if run.get("commit") else ""
        lines.append(f"- **{name}**{code}: " + "; ".join(
            f"{c['t_s']:.1f} s {c['kind']} v{c['version']} {_plan_text(c['stages'])}"
            for c in run["plan_changes"]))  # fmt: skip
        applied = [f"{a['t_s']:.1f} s {a['label']} → {a.get('node') or '—'}"
                   + ("" if a["ok"] else f" (not applied: {a['detail'][:80]})") for a in run["timeline"]]  # fmt: skip
        lines.append(f"  events: {'; '.join(applied)}")
    return lines


def has_ratio_target(scenario: str) -> bool:
    """The scenarios (and their variants) whose target is adaptive's p95 ≥ 2× lower than static's."""
    return scenario.startswith(("node_slowdown", "link_degradation"))


def ratio_verdict(ratio: float | None, adaptive_failed: int) -> str:
    """That target: static ÷ adaptive p95 at least 2 with no failed adaptive request."""
    return "met" if ratio is not None and ratio >= 2.0 and adaptive_failed == 0 else "NOT met"


def target_lines(scenario: str, comparison: dict | None) -> list[str]:
    """The issue's targets for this scenario against what was measured."""
    if comparison is None:
        return ["Targets: adaptive or static did not run (or could not deploy); no comparison."]
    ratio = comparison["static_over_adaptive_p95"]
    settled = comparison.get("static_over_adaptive_settled_p95")
    if "adaptive_settled_p95_s" in comparison:
        ratio_text = (f"{_s(ratio)} over the phase (requests in flight at the change included), {_s(settled)} over "
                      f"the requests that started after it (adaptive {_s(comparison['adaptive_settled_p95_s'])} s, "
                      f"static {_s(comparison['static_settled_p95_s'])} s)")  # fmt: skip
    else:
        ratio_text = _s(ratio)
    text = (f"After the first change: static p95 ÷ adaptive p95 = {ratio_text}; failed requests adaptive "
            f"{comparison['adaptive_failed']}, static {comparison['static_failed']}; served adaptive "
            f"{comparison['adaptive_served']}, static {comparison['static_served']}.")  # fmt: skip
    if comparison.get("drift_corrected_ratio") is not None:
        text += (f" For context, not the target: with each p95 taken over the same run's p50 before the change "
                 f"(which cancels the machine's drift between runs), static ÷ adaptive = "
                 f"{_s(comparison['drift_corrected_ratio'])}.")  # fmt: skip
    if comparison.get("adaptive_transition"):
        text += f" {transition_text(comparison['adaptive_transition'])}"
    if has_ratio_target(scenario):
        failed = comparison["adaptive_failed"]
        text += f" Target (≥ 2× lower p95, zero failures): **{ratio_verdict(ratio, failed)}** over the phase"
        if "static_over_adaptive_settled_p95" in comparison:
            text += f", **{ratio_verdict(settled, failed)}** over the requests started after the change"
        text += "."
    elif scenario == "node_loss":
        met = (
            comparison["adaptive_served"] > 0 and comparison["adaptive_failed"] < comparison["static_failed"]
        )
        text += f" Target (adaptive keeps serving where static cannot): **{'met' if met else 'NOT met'}**."
    return [text]


def transition_text(step: dict) -> str:
    """One sentence: how long adaptive took to see, confirm and roll out its first change."""
    return (f"Adaptive's first change ({step['kind']}): a gain seen {step['seen_s']:.1f} s after the event, "
            f"confirmed by {step['confirmed_by']}, rollout begun at {step['rollout_s']:.1f} s and committed at "
            f"{step['committed_s']:.1f} s ({step['rollout_took_s']:.1f} s to roll out).")  # fmt: skip


def rounds_lines(scenario: str, summary: dict | None) -> list[str]:
    """The repeated rounds' ratios and, for the two scenarios with a 2× target, the verdict on their median."""
    if summary is None:
        return []
    each = ", ".join(
        f"{_s(r)} ({_s(t)})" for r, t in zip(summary["ratios"], summary["settled_ratios"], strict=True)
    )
    text = (f"Over {summary['rounds']} rounds (round 1 is the table above; each later round reruns adaptive and "
            f"static, one after the other): static p95 ÷ adaptive p95 = {each} over the phase (over the requests "
            f"started after the change); median {_s(summary['median_ratio'])} "
            f"({_s(summary['median_settled_ratio'])}); failed requests in all rounds: adaptive "
            f"{summary['adaptive_failed']}, static {summary['static_failed']}.")  # fmt: skip
    if has_ratio_target(scenario):
        failed = summary["adaptive_failed"]
        text += (f" Target on the medians (≥ 2× lower p95, zero failures): "
                 f"**{ratio_verdict(summary['median_ratio'], failed)}** over the phase, "
                 f"**{ratio_verdict(summary['median_settled_ratio'], failed)}** over the requests started "
                 "after the change.")  # fmt: skip
    steps = summary.get("transitions") or []
    if any(steps):
        text += " Adaptive's first change per round, committed after: " + ", ".join(
            f"{t['committed_s']:.1f} s ({t['confirmed_by']})" if t else "—" for t in steps) + "."  # fmt: skip
    return [text]


def network_line(runs: dict[str, dict]) -> str:
    """How the runs' links were made (runs from before the option existed were all loopback)."""
    say = {"netns": "a network namespace per worker, bandwidth capped by tc tbf on its uplink, RTT emulated "
                    "by the worker",
           "loopback": "every process on loopback, bandwidth and RTT emulated by the worker"}  # fmt: skip
    by_net: dict[str, list[str]] = {}
    for name, run in runs.items():
        if not run.get("run_failed"):
            by_net.setdefault(run.get("network", "loopback"), []).append(name)
    if len(by_net) == 1:
        return f"Links: {say[next(iter(by_net))]}."
    return (
        "Links: " + "; ".join(f"{say[n]} ({', '.join(names)})" for n, names in sorted(by_net.items())) + "."
    )


def markdown(result: dict) -> str:
    """One scenario's report: set-up, SLO, the table, plans, targets, notes."""
    sc, cfg, m = result["scenario"], result["config"], result["machine"]
    workers = ", ".join(
        f"{w['id']} ({w['memory'] / 1e6:.0f} MB" + (f", {w['slowdown']:g}× slower" if w["slowdown"] > 1 else "")
        + ")" if w.get("memory") else w["id"] for w in sc["cluster"]["workers"])  # fmt: skip
    slo = result["slo"]
    slo_text = (f"SLO: a request within {slo['slo_s']:.2f} s = {SLO_FACTOR}× the p50 of {slo['from']} before "
                f"the first change." if slo["slo_s"] else "SLO: none (no strategy served before the change).")  # fmt: skip
    lines = [f"# Adaptation: {sc['name']}", "", sc["description"] + ".", "",
             f"{m['date']}, {m['nproc']} cores ({m['cpu']}); 1-minute load average "
             f"{_s(m['loadavg_start'], '.1f')} → {_s(m['loadavg_end'], '.1f')}. Model {cfg['model']} "
             f"({sc.get('weight_format', 'fp32')} weights), "
             f"{sc['sessions']} closed-loop chat sessions (temperature 0, "
             + (f"prompts of ~{sc['prompt_tokens']} tokens, " if sc.get("prompt_tokens") else "")
             + f"{sc['max_tokens']} tokens each), "
             f"{sc['duration_s']:g} s of load per strategy, warm-up {sc['warmup_s']:g} s. Workers: {workers}. "
             f"{network_line(result['runs'])}",
             "", "Timeline: " + "; ".join(f"{e['at_s']:g} s {e['label']}" for e in sc["timeline"]) + ".", "",
             slo_text, "", *table_lines(result["table"], result["runs"]), "",
             *target_lines(sc["name"], result["comparison"]), "",
             *sum(([line, ""] for line in rounds_lines(sc["name"], result.get("rounds_summary"))), []),
             *sum(([line] for line in compression_lines(result)), []), *([""] if compression_lines(result) else []),
             "Plans and events per strategy:", "",
             *plan_lines(result["runs"]), "", f"Same answer text on every successful request: "
             f"{'yes' if result['same_text'] else 'no'}.", ""]  # fmt: skip
    if result.get("plot"):
        lines += [f"![request latency over time]({result['plot']})", ""]
    lines += ["Notes:", "", *NOTES, ""]
    return "\n".join(lines) + "\n"


NOTES = [
    "- Each strategy runs on a fresh local stack (own Redis, SQLite, workers) with the same scenario; the "
    "model is calibrated on every worker before the deployment is created, and the load starts once it is "
    "ready. Strategies run one after the other, so they do not share the CPU, but the machine is shared "
    "with other work (see the load average), which moves absolute figures by tens of per cent.",
    "- Phases: a request belongs to the interval in which it ends, so one in flight at a change counts "
    "after it. Requests that start in the warm-up are left out. p50/p95 over successful requests; tokens/s "
    "= completion tokens of the phase's successful requests ÷ the phase's length; SLO met = share of the "
    "phase's requests (failures included, as misses) within the SLO; re-plans = remap, resplit, reformat (a hop's activation format only) and recover "
    "commits in the phase; first re-plan after = seconds from the change to the first of them. p50 ÷ before "
    "= the phase's p50 over the same strategy's p50 before the first change: strategies run one after the "
    "other on a shared machine whose speed drifts between runs, and this ratio is what stays comparable.",
    "- Recovered after: seconds from the change until three requests in a row that started after it have a "
    "median latency within 1.2× the p50 of the phase before it (a failure counts as infinitely slow); "
    "'never': not within the phase.",
    "- A client whose request failed waits 0.5 s before the next one, so a broken chain is not counted "
    "thousands of times; the failure counts are therefore a rate, not a count of users turned away.",
    "- Roles (@busiest, @middle, ...) are resolved on each strategy's own plan when the event fires: every "
    "strategy meets the same adversity on its own plan, not the same node id.",
]
