"""What adaptation is worth: scenario runs of the whole stack under each planning strategy.

Run: ``python -m bench.adapt [--scenarios a,b] [--strategies x,y] [--duration 1.0] [--sessions 2] [--net auto]``.
For each scenario of ``bench/scenarios/`` and each strategy: a fresh LocalStack
with the scenario's workers, the deployment ``smol`` (SmolLM2-135M) under the
strategy's policy, N closed-loop chat sessions through the gateway while the
timeline is applied (emulation, SIGKILL, a worker joining, more sessions),
every request and plan change recorded, then the stack is stopped. Links:
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
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.adapt_scenario import (
    AdaptScenario,
    TimelineEvent,
    load_adapt_scenario,
    resolve_node,
    scenario_names,
)
from bench.adapt_stats import choose_slo, first_change_comparison, markdown, rounds_summary, strategy_rows
from edgeorch.netns import unavailable_reason
from edgeorch.schemas.profile import profile_key
from edgeorch.settings import CommonSettings
from edgeorch.stack import LocalStack
from edgeorch.up_command import calibrate

MODEL, DEPLOYMENT = "smollm2-135m", "smol"
# Orchestrator policies (edgeorch.schemas.orchestrator.QosPolicy), one per strategy.
STRATEGIES: dict[str, dict] = {
    "adaptive": {"cooldown_s": 5},
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
# A haiku runs past 24 tokens (a capital city ends in 8), so every request generates max_tokens.
MESSAGES = [{"role": "user", "content": "Write a haiku about the sea."}]
FAILED_BACKOFF_S = 0.5  # a client pauses after an error instead of hammering a broken chain
POLL_S = 0.5
REQUEST_TIMEOUT_S = 120.0
RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    """Progress to stderr."""
    print(msg, file=sys.stderr, flush=True)


class Run:
    """What one strategy's run records, on a clock that starts with the load (seconds)."""

    def __init__(self, stack: LocalStack, sessions: int):
        self.stack = stack
        self.url = stack.orchestrator_url
        self.headers = {"Authorization": f"Bearer {stack.admin_token}"}
        self.t0 = time.time()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.active_sessions = sessions
        self.requests: list[dict] = []
        self.plan_samples: list[dict] = []  # (t_s, version, state, stages) every POLL_S
        self.timeline: list[dict] = []

    def now(self) -> float:
        return time.time() - self.t0

    def deployment(self) -> dict:
        return httpx.get(f"{self.url}/v1/deployments/{DEPLOYMENT}", timeout=10).json()

    def version_at(self, t_s: float) -> int | None:
        with self.lock:
            seen = [p["version"] for p in self.plan_samples if p["t_s"] <= t_s]
        return seen[-1] if seen else None

    # ----- background threads ------------------------------------------------------------------

    def poll_plan(self) -> None:
        """The active version, state and stages every POLL_S (a request is tagged with the one at its start)."""
        while not self.stop.is_set():
            try:
                d = self.deployment()
                with self.lock:
                    self.plan_samples.append({"t_s": self.now(), "version": d.get("version"),
                                              "state": d.get("state"), "stages": d.get("stages", [])})  # fmt: skip
            except (httpx.HTTPError, ValueError) as exc:
                log(f"  plan poll failed: {exc!r}")
            self.stop.wait(POLL_S)

    def session(self, index: int, max_tokens: int) -> None:
        """One closed-loop chat session: the next request as soon as the last one is answered."""
        body = {"model": DEPLOYMENT, "messages": MESSAGES, "temperature": 0, "max_tokens": max_tokens}
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
            while not self.stop.is_set():
                if index >= self.active_sessions:  # a `load` event has not started this one yet
                    self.stop.wait(0.1)
                    continue
                start = self.now()
                rec = {"session": index, "start_s": start, "version": self.version_at(start)}
                try:
                    r = client.post(f"{self.url}/v1/chat/completions", json=body)
                    rec["status"] = r.status_code
                    if r.status_code == 200:
                        out = r.json()
                        rec.update(tokens=out["usage"]["completion_tokens"],
                                   text=out["choices"][0]["message"]["content"])  # fmt: skip
                    else:
                        rec["error"] = r.text[:300]
                except httpx.HTTPError as exc:
                    rec.update(status=0, error=repr(exc)[:300])
                rec["end_s"] = self.now()
                rec["latency_s"] = rec["end_s"] - start
                rec["ok"] = rec["status"] == 200
                rec.setdefault("tokens", 0)
                with self.lock:
                    self.requests.append(rec)
                if not rec["ok"]:
                    self.stop.wait(FAILED_BACKOFF_S)

    def apply_timeline(self, events: list[TimelineEvent]) -> None:
        """Each event at its time; a role is resolved on the plan active at that moment."""
        for event in events:
            if self.stop.wait(max(0.0, event.at_s - self.now())):
                return
            rec = {"at_s": event.at_s, "t_s": self.now(), "kind": event.kind, "label": event.label()}
            try:
                rec.update(self.apply(event))
                rec["ok"] = True
            except Exception as exc:  # recorded and reported; the run goes on
                rec.update(ok=False, detail=repr(exc))
            rec["done_s"] = self.now()
            self.timeline.append(rec)
            log(f"  [{rec['t_s']:5.1f}s] {rec['label']} → {rec.get('node')} "
                f"({'ok' if rec['ok'] else rec['detail']})")  # fmt: skip

    def apply(self, event: TimelineEvent) -> dict:
        """Make one change; returns what it resolved to."""
        if event.kind == "load":
            self.active_sessions = event.sessions
            return {"node": None}
        if event.kind == "join":
            spec = event.spec.model_dump(by_alias=True, exclude_none=True, exclude={"node_id"})
            self.stack.add_worker(event.spec.node_id, wait=True, **spec)
            return {"node": event.spec.node_id}
        stages = self.deployment().get("stages", [])
        node = resolve_node(event.node, stages, [w.name for w in self.stack.workers])
        if node is None:
            raise RuntimeError(f"{event.node} names no running node (plan {stages})")
        if event.kind == "kill":
            self.stack.kill_worker(node)
            return {"node": node}
        worker = self.stack.worker(node).url
        emu = httpx.get(f"{worker}/v1/admin/emulation", timeout=10).json()
        shaped = None
        if event.kind == "slowdown":
            emu["slowdown"] = event.factor
        else:
            bandwidth = event.bandwidth_mbps
            if (
                bandwidth is not None and self.stack.testbed is not None
            ):  # the kernel shapes it, not the worker
                self.stack.set_uplink(node, bandwidth)
                shaped, bandwidth = self.stack.testbed.uplink(node), None
            emu.update({k: v for k, v in (("bandwidth_mbps", bandwidth), ("rtt_ms", event.rtt_ms))
                        if v is not None})  # fmt: skip
        r = httpx.post(f"{worker}/v1/admin/emulation", json=emu, headers=self.headers, timeout=10)
        r.raise_for_status()
        return {"node": node, "emulation": r.json(), **({"tbf": shaped} if shaped else {})}


def deploy(stack: LocalStack, policy: dict, timeout_s: float = 180.0) -> dict:
    """Create ``smol`` under ``policy``; the view once ready or failed (failed: the splitter found no plan)."""
    headers = {"Authorization": f"Bearer {stack.admin_token}"}
    r = httpx.post(f"{stack.orchestrator_url}/v1/deployments", headers=headers, timeout=30,
                   json={"name": DEPLOYMENT, "model": MODEL, "policy": policy})  # fmt: skip
    if r.status_code != 201:
        raise RuntimeError(f"deployment refused ({r.status_code}): {r.text[:300]}")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        d = httpx.get(f"{stack.orchestrator_url}/v1/deployments/{DEPLOYMENT}", timeout=10).json()
        if d["state"] in ("ready", "failed"):
            return d
        time.sleep(0.5)
    raise RuntimeError(f"deployment not ready after {timeout_s:.0f} s: {d['state']} {d.get('reason')}")


def plan_changes(events: list[dict], t0: float) -> list[dict]:
    """The decision log's plan changes (deploy, remap, resplit, recover) on the run's clock."""
    out = []
    for e in events:
        if e["kind"] in ("deploy", "remap", "resplit", "recover"):
            data = e.get("data") or {}
            out.append({"t_s": e["ts"] - t0, "kind": e["kind"], "version": data.get("version"),
                        "stages": data.get("stages", []), "message": e["message"][:300]})  # fmt: skip
    return out


def run_strategy(
    scenario: AdaptScenario, name: str, policy: dict, store: Path, network: str = "loopback"
) -> dict:
    """One strategy on a fresh stack: deploy, load + timeline, records; the stack is always stopped."""
    log_dir = Path(tempfile.mkdtemp(prefix=f"edgeorch-adapt-{scenario.name}-{name}-"))
    stack = LocalStack(scenario.cluster, model_store=store, log_dir=log_dir, private_redis=True,
                       jobs_worker=False, report=lambda msg: None, network=network)  # fmt: skip
    out: dict = {"strategy": name, "policy": policy, "logs": str(log_dir), "commit": code_version(),
                 "network": network,
                 "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}  # fmt: skip
    try:
        t_start = time.monotonic()
        stack.start()
        with httpx.Client(timeout=30) as client:
            calibrate(client, stack.monitor_url, stack.admin_token, profile_key(MODEL, scenario.weight_format),
                      [w.node_id for w in scenario.cluster.workers], 60.0)  # fmt: skip
        d = deploy(stack, policy)
        out["startup_s"] = time.monotonic() - t_start
        if d["state"] == "failed":
            log(f"  {name}: infeasible: {d.get('reason')}")
            return {**out, "infeasible": True, "reason": d.get("reason") or "failed"}
        plan = [(s["node"], s["start"], s["end"]) for s in d["stages"]]
        log(f"  {name}: ready in {out['startup_s']:.0f} s, plan {plan}")
        run = Run(stack, scenario.sessions)
        run.plan_samples.append({"t_s": 0.0, "version": d.get("version"), "state": d["state"],
                                 "stages": d["stages"]})  # fmt: skip
        threads = [threading.Thread(target=run.poll_plan, daemon=True)]
        threads += [threading.Thread(target=run.session, args=(i, scenario.max_tokens), daemon=True)
                    for i in range(scenario.max_sessions())]  # fmt: skip
        threads.append(threading.Thread(target=run.apply_timeline, args=(scenario.timeline,), daemon=True))
        for t in threads:
            t.start()
        run.stop.wait(scenario.duration_s)
        run.stop.set()
        for t in threads:
            t.join(timeout=REQUEST_TIMEOUT_S)
        events = httpx.get(f"{stack.orchestrator_url}/v1/events", timeout=30,
                           params={"deployment": DEPLOYMENT, "limit": 10000}).json()  # fmt: skip
        out.update(requests=sorted(run.requests, key=lambda r: r["start_s"]), plan_samples=run.plan_samples,
                   timeline=run.timeline, plan_changes=plan_changes(events, run.t0),
                   events=[{**e, "t_s": e["ts"] - run.t0} for e in events], t0=run.t0)  # fmt: skip
        ok = [r for r in run.requests if r["ok"]]
        log(
            f"  {name}: {len(run.requests)} requests, {len(run.requests) - len(ok)} failed, "
            f"{sum(1 for c in out['plan_changes'] if c['kind'] != 'deploy')} plan changes"
        )
        return out
    finally:
        stack.stop()


def code_version() -> str:
    """The commit the stack ran (``+dirty`` with uncommitted changes): each run starts fresh processes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "") if head else "unknown"


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
            **rounds(scenario, runs, repeats or {}, times, window, slo_s)}  # fmt: skip


def rounds(scenario: AdaptScenario, runs: dict[str, dict], repeats: dict[str, list[dict]],
           times: list[float], window: tuple[float, float], slo_s: float | None) -> dict:  # fmt: skip
    """``repeats`` (raw) and each round's comparison with their summary, when there are later rounds."""
    if not any(repeats.values()):
        return {}
    labels = [e.label() for e in scenario.timeline]
    comparisons = []
    for k in range(1 + max(len(v) for v in repeats.values())):
        pair = {}
        for name in ("adaptive", "static"):
            later = repeats.get(name) or []
            pair[name] = runs.get(name) if k == 0 else (later[k - 1] if k - 1 < len(later) else None)
        if any(r is None or r.get("infeasible") for r in pair.values()):
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
