"""What adaptation is worth: scenario runs of the whole stack under each planning strategy.

Run: ``python -m bench.adapt [--scenarios a,b] [--strategies x,y] [--duration 1.0] [--sessions 2] [--net auto]``.
For each scenario of ``bench/scenarios/`` and each strategy: a fresh LocalStack
with the scenario's workers, the deployment ``smol`` (SmolLM2-135M) under the
strategy's policy, N closed-loop chat sessions through the gateway while the
timeline is applied (emulation, SIGKILL, a worker joining, more sessions),
every request and plan change recorded, then the stack is stopped (one run:
``bench/adapt_run.py``; this module: rounds, results and the command line). Links:
with ``--net netns`` (``auto``, the default, picks it where the machine
allows: root and a kernel with namespaces and ``tbf``) every worker runs in
a network namespace of its own and a link's bandwidth is a real ``tc tbf``
cap on the node's uplink; with ``loopback`` the worker paces its own sends.
RTT is the worker's emulation either way (no ``netem`` here). Writes
``bench/results/adapt_<scenario>.{json,md,png}`` after each strategy, so an
interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

from bench.adapt_markdown import markdown
from bench.adapt_run import DEPLOYMENT, FAILED_BACKOFF_S, MESSAGES, MODEL, log, run_strategy
from bench.adapt_scenario import AdaptScenario, load_adapt_scenario, scenario_names
from bench.adapt_stats import choose_slo, first_change_comparison, rounds_summary, strategy_rows
from edgeorch.local.netns import unavailable_reason
from edgeorch.service.settings import CommonSettings

# Orchestrator policies (edgeorch.schemas.orchestrator.QosPolicy), one per strategy.
STRATEGIES: dict[str, dict] = {
    # Adaptive may compress a hop's activations (bf16, int8) on a slow link: the default policy.
    "adaptive": {"cooldown_s": 5},
    # The same without compression: every hop fp32, what adaptive was before issue 21.
    "adaptive_fp32": {"cooldown_s": 5, "activation_formats": ["fp32"]},
    "static": {"adaptive": False, "recover": False},
    "even": {"strategy": "even", "adaptive": False, "recover": False},
    "memory_proportional": {"strategy": "memory_proportional", "adaptive": False, "recover": False},
    # Re-planned on a timer only, as Petals rebalances its servers periodically.
    "greedy_throughput": {
        "strategy": "greedy_throughput",
        "adaptive": False,
        "replan_every_s": 10,
        "recover": True,
    },  # fmt: skip
}
RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    """What ran the benchmark."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "loadavg_start": os.getloadavg()[0], "loadavg_end": None}  # fmt: skip


def summarise(
    scenario: AdaptScenario,
    runs: dict[str, dict],
    machine: dict,
    plot: str | None,
    repeats: dict[str, list[dict]] | None = None,
) -> dict:
    """The scenario's result: raw runs plus the per-phase table every report is made from.

    ``repeats``: later rounds' runs per strategy (``--repeats``); round k pairs
    each strategy's k-th run, and the target is also judged on the median.
    """
    times = [e.at_s for e in scenario.timeline]
    labels = [e.label() for e in scenario.timeline]
    slo_s, slo_from = choose_slo(runs, times, scenario.warmup_s)
    window = (times[0], times[1] if len(times) > 1 else float("inf"))
    table = {name: strategy_rows(run, times, labels, scenario.warmup_s, scenario.duration_s, slo_s)
             for name, run in runs.items() if not run.get("infeasible")}  # fmt: skip
    texts = {r["text"] for run in runs.values() for r in run.get("requests", []) if r["ok"]}
    sc = scenario.model_dump(by_alias=True, exclude={"cluster", "timeline"})
    sc["cluster"] = scenario.cluster.model_dump(by_alias=True)
    sc["timeline"] = [
        {**e.model_dump(by_alias=True, exclude_none=True), "label": e.label()} for e in scenario.timeline
    ]
    return {"scenario": sc, "config": {"model": MODEL, "deployment": DEPLOYMENT, "messages": MESSAGES,
                                       "strategies": {n: r["policy"] for n, r in runs.items()},
                                       "failed_backoff_s": FAILED_BACKOFF_S},
            "machine": {**machine, "loadavg_end": machine.get("loadavg_end") or os.getloadavg()[0]}, "slo": {"slo_s": slo_s, "from": slo_from},
            "table": table, "comparison": first_change_comparison(table, runs, window), "same_text": len(texts) <= 1,
            "texts": sorted(texts), "plot": plot, "runs": runs,
            **rounds(scenario, runs, repeats or {}, times, labels, window, slo_s)}  # fmt: skip


def rounds(scenario: AdaptScenario, runs: dict[str, dict], repeats: dict[str, list[dict]],
           times: list[float], labels: list[str], window: tuple[float, float],
           slo_s: float | None) -> dict:  # fmt: skip
    """``repeats`` (raw) and each round's comparison with their summary, when there are later rounds.

    Round k pairs adaptive's and static's k-th runs (round 1: ``runs``); a
    round missing either, or with either not run, compares nothing.
    """
    if not any(repeats.values()):
        return {}
    comparisons = []
    for k in range(1 + max(len(v) for v in repeats.values())):
        pair = {}
        for name in ("adaptive", "static"):
            later = repeats.get(name) or []
            pair[name] = runs.get(name) if k == 0 else (later[k - 1] if k - 1 < len(later) else None)
        if any(not r or r.get("infeasible") for r in pair.values()):
            comparisons.append(None)
            continue
        table = {name: strategy_rows(run, times, labels, scenario.warmup_s, scenario.duration_s, slo_s)
                 for name, run in pair.items()}  # fmt: skip
        comparisons.append(first_change_comparison(table, pair, window))
    return {
        "repeats": repeats,
        "round_comparisons": comparisons,
        "rounds_summary": rounds_summary(comparisons),
    }


def write_results(scenario: AdaptScenario, runs: dict[str, dict], machine: dict, out_dir: Path,
                  repeats: dict[str, list[dict]] | None = None) -> str:  # fmt: skip
    """JSON, PNG and Markdown for one scenario; returns the Markdown."""
    from bench.adapt_plot import plot_latency

    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"adapt_{scenario.name}.png"
    result = summarise(scenario, runs, machine, png.name, repeats)
    plot_latency(result, png)
    (out_dir / f"adapt_{scenario.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (out_dir / f"adapt_{scenario.name}.md").write_text(md)
    return md


def rebuild(names: list[str], out_dir: Path) -> int:
    """Tables and plots again from the stored raw records (after a change to the statistics or the plot)."""
    for name in names:
        path = out_dir / f"adapt_{Path(name).stem}.json"
        if not path.exists():
            log(f"no {path}; skipped")
            continue
        result = json.loads(path.read_text())
        sc = dict(result["scenario"])
        sc["timeline"] = [{k: v for k, v in e.items() if k != "label"} for e in sc["timeline"]]
        scenario = AdaptScenario.model_validate(sc)
        write_results(scenario, result["runs"], result["machine"], out_dir, result.get("repeats"))
        log(f"rebuilt {path.with_suffix('.md')} and .png")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; the defaults take about 5 minutes per scenario on a 2-core machine."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default=",".join(scenario_names()),
                   help=f"comma-separated names in bench/scenarios/ or YAML paths (default: {','.join(scenario_names())})")  # fmt: skip
    p.add_argument(
        "--strategies", default=",".join(STRATEGIES), help=f"among {','.join(STRATEGIES)} (default: all)"
    )
    p.add_argument(
        "--duration", type=float, default=1.0, help="scale every time of the timelines (default 1.0)"
    )
    p.add_argument(
        "--sessions", type=int, default=None, help="closed-loop sessions (default: the scenario's, 2)"
    )
    p.add_argument("--store", type=Path, default=None, help="model store (default: EDGEORCH_MODEL_STORE)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--merge", action="store_true",
                   help="keep the other strategies' runs already in the scenario's JSON (rerun only --strategies)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds: round 1 runs every strategy, each later one reruns adaptive and static, and the "
                        "target is also judged on the median of the rounds' ratios (default 1)")  # fmt: skip
    p.add_argument("--net", choices=("auto", "netns", "loopback"), default="auto",
                   help="links: real tbf caps in a namespace per worker (netns), the workers' own pacing "
                        "(loopback), or netns where the machine allows (auto, the default)")  # fmt: skip
    p.add_argument("--rebuild", action="store_true",
                   help="run nothing: remake the tables and plots from the JSON files in --out-dir")  # fmt: skip
    args = p.parse_args(argv)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown or not args.strategies:
        p.error(f"unknown strategies {unknown}; choose among {list(STRATEGIES)}")
    if args.duration <= 0 or (args.sessions is not None and args.sessions < 1) or args.repeats < 1:
        p.error("--duration must be positive, --sessions and --repeats at least 1")
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    args.store = args.store or CommonSettings().model_store
    if not args.rebuild:
        args.net = choose_network(args.net, p.error)
    return args


def choose_network(asked: str, error) -> str:
    """``auto`` → netns where a testbed can be made, else loopback (said on stderr); ``netns`` must work."""
    if asked == "loopback":
        return asked
    reason = unavailable_reason()
    if reason is None:
        return "netns"
    if asked == "netns":
        error(f"--net netns: {reason}")
    log(f"links emulated by the workers (loopback): {reason}")
    return "loopback"


def strategy_policy(name: str, scenario: AdaptScenario) -> dict:
    """The deployment policy of a strategy in a scenario: the strategy's rules, the scenario's weights."""
    policy = dict(STRATEGIES[name])
    if scenario.weight_format != "fp32":  # fp32 is the default: policies of earlier runs read the same
        policy["weight_format"] = scenario.weight_format
    if scenario.prompt_tokens is not None:  # plans are made for the scenario's request shape
        policy["workload"] = {"prompt_tokens": scenario.prompt_tokens, "generated_tokens": scenario.max_tokens,
                              "max_sessions": scenario.max_sessions(),
                              "context_tokens": scenario.prompt_tokens + scenario.max_tokens}  # fmt: skip
    return policy


def main(argv: list[str] | None = None) -> int:
    """Every scenario × strategy; results are rewritten after each strategy."""
    args = parse_args(argv)
    if args.rebuild:
        return rebuild(args.scenarios, args.out_dir)
    scenarios = [load_adapt_scenario(s).scaled(args.duration, args.sessions) for s in args.scenarios]
    for scenario in scenarios:
        log(f"[{scenario.name}] {scenario.description}")
        machine, runs, repeats = machine_info(), {}, {}
        stored = args.out_dir / f"adapt_{scenario.name}.json"
        if args.merge and stored.exists():
            old = json.loads(stored.read_text())
            runs = {n: r for n, r in old["runs"].items() if n not in args.strategies}
            repeats = {n: r for n, r in (old.get("repeats") or {}).items() if n not in args.strategies}
            machine = {**old["machine"], "loadavg_end": None, "merged": True}
        for k in range(args.repeats):
            names = args.strategies if k == 0 else [n for n in ("adaptive", "static") if n in args.strategies]
            for name in names:
                t = time.monotonic()
                policy = strategy_policy(name, scenario)
                try:
                    run = run_strategy(scenario, name, policy, args.store, args.net)
                except Exception as exc:  # one broken run must not lose the others; its row says why
                    log(f"  {name}: run failed: {exc!r}")
                    run = {"strategy": name, "policy": policy, "infeasible": True, "run_failed": True,
                           "reason": f"run failed: {exc!r}"[:400]}  # fmt: skip
                if k == 0:
                    runs[name] = run
                    runs = {n: runs[n] for n in STRATEGIES if n in runs}  # the table's order stays the same
                else:
                    repeats.setdefault(name, []).append(run)
                md = write_results(scenario, runs, machine, args.out_dir, repeats)
                log(f"[{scenario.name}] round {k + 1}: {name} done in {time.monotonic() - t:.0f} s")
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
