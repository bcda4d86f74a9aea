"""The control plane at 100, 300 and 1,000 simulated nodes: where it saturates first.

For each fleet size the real monitor, splitter, broadcast, orchestrator and a
private Redis start as processes (edgeorch/local/stack.py, no workers); one
process (this one) runs the simulated nodes (edgeorch/sim), which register,
heartbeat every second, calibrate, report links, pull signed desired states
and ack PREPAREs like workers. Two deployments (a 32-layer and an 80-layer
Llama shape, int8) are planned over them. Then, under churn (1 % of the nodes
leave and as many join per minute, 5 % run 2x slower), it measures: monitor
CPU and heartbeat latency, heartbeats delivered against due, bus messages/s,
time from a plan node's loss (and slowdown) to the committed new plan,
planner time per objective through the splitter, rollout time against the
nodes a plan touches, and the memory of every control-plane process.

    python -m bench.scale                 # 100, 300, 1000 nodes; writes bench/results/scale.{json,md,svg}
    python -m bench.scale --quick         # 20 and 50 nodes, short windows; writes nothing
    python -m bench.scale --sizes 200 --window-s 30
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.scale_probes import ProcWindow, RedisCounters, beat_figures, sample_until
from bench.scale_report import markdown, plot
from edgeorch.local.scenario import Scenario
from edgeorch.local.stack import LocalStack
from edgeorch.sim.fleet import FleetConfig, SimFleet, make_specs
from edgeorch.sim.models import write_sim_models
from edgeorch.sim.node import SimConfig

log = logging.getLogger("bench.scale")
RESULTS = Path(__file__).resolve().parent / "results"
STORE = Path(os.environ.get("EDGEORCH_MODEL_STORE", "~/.cache/edgeorch/models")).expanduser()
DEPLOYMENTS = {"d32": "sim-llama-32", "d80": "sim-llama-80"}
FORMAT = "int8"
CHANGE_TIMEOUT_S = 60.0
JOIN_BATCH = 25
MEASURE_TIMEOUT_S = 900.0


class Run:
    """One fleet size: the stack, the fleet, an HTTP client with the admin token."""

    def __init__(self, stack: LocalStack, fleet: SimFleet, client: httpx.AsyncClient):
        self.stack, self.fleet, self.client = stack, fleet, client
        self.next_id = 0

    async def deployment(self, name: str) -> dict:
        return (await self.client.get(f"{self.stack.orchestrator_url}/v1/deployments/{name}")).json()

    async def join(self, count: int, seed: int) -> None:
        """Start ``count`` new nodes, in batches (a registration storm is not what is measured)."""
        specs = make_specs(count, seed=seed, start=self.next_id)
        self.next_id += count
        for i in range(0, len(specs), JOIN_BATCH):
            await asyncio.gather(*(self.fleet.add(s) for s in specs[i : i + JOIN_BATCH]))
            await asyncio.sleep(0.2)

    def plan_nodes(self, views: list[dict]) -> set[str]:
        return {s["node"] for v in views for s in v.get("stages", [])}


async def settle(run: Run, quiet_s: float = 5.0, timeout_s: float = 180.0) -> float:
    """Seconds until the monitor has seen every running node alive for ``quiet_s`` in a row (the
    join's and the first calibrations' storms over), or ``timeout_s``; the window opens then."""
    t0 = time.monotonic()
    since = None
    while time.monotonic() - t0 < timeout_s:
        alive = len(
            (await run.client.get(f"{run.stack.monitor_url}/v1/nodes", params={"state": "alive"})).json()
        )
        if alive >= len(run.fleet.nodes):
            since = since or time.monotonic()
            if time.monotonic() - since >= quiet_s:
                break
        else:
            since = None
        await asyncio.sleep(0.5)
    return time.monotonic() - t0


async def wait_committed(run: Run, name: str, after_version: int | None, gone: str | None) -> float | None:
    """Seconds until ``name`` has a version newer than ``after_version`` (without ``gone``); None on timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < CHANGE_TIMEOUT_S:
        v = await run.deployment(name)
        newer = v.get("version") and (after_version is None or v["version"] > after_version)
        if newer and (gone is None or gone not in {s["node"] for s in v["stages"]}):
            return time.monotonic() - t0
        await asyncio.sleep(0.1)
    return None


async def change_to_commit(run: Run, name: str, kind: str, rng: random.Random) -> dict:
    """Lose (or slow 4x) a node of the deployment's plan; time until a committed plan without it."""
    view = await run.deployment(name)
    running = sorted({s["node"] for s in view["stages"]} & set(run.fleet.nodes))  # churn may have taken one
    if not running:
        return {"deployment": name, "change": kind, "node": None, "to_commit_s": None, "stages_before": 0}
    node = rng.choice(running)
    t0 = time.monotonic()
    if kind == "loss":
        await run.fleet.remove(node)
    else:
        run.fleet.slow(node, 4.0)
    took = await wait_committed(run, name, view["version"], node)
    if kind == "slowdown" and node in run.fleet.nodes:
        run.fleet.slow(node, 1.0)
    return {"deployment": name, "change": kind, "node": node, "to_commit_s": took,
            "stages_before": len(view["stages"]), "at": t0}  # fmt: skip


async def churn(run: Run, n: int, stop: asyncio.Event, protected: set[str], rng: random.Random) -> dict:
    """1 % of the nodes leave and as many join per minute, spread evenly; returns the counts."""
    every_s = 60.0 / max(1e-9, 0.01 * n)
    left = joined = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every_s * rng.uniform(0.5, 1.5))
            break
        except TimeoutError:
            pass
        candidates = sorted(set(run.fleet.nodes) - protected)
        if candidates:
            await run.fleet.remove(rng.choice(candidates))
            left += 1
        await run.join(1, seed=rng.randrange(1 << 30))
        joined += 1
    return {"left": left, "joined": joined}


async def planner_times(run: Run, profile_keys: dict[str, str], time_limit_s: float) -> list[dict]:
    """Each objective on the 80-layer deployment's cluster, through the splitter as the orchestrator asks."""
    from edgeorch.orchestration.snapshot import cluster_from_monitor, plan_request
    from edgeorch.schemas.monitor import LinkView, NodeView
    from edgeorch.schemas.orchestrator import QosPolicy

    mon = run.stack.monitor_url
    nodes = [NodeView.model_validate(x) for x in (await run.client.get(
        f"{mon}/v1/nodes", params={"model": profile_keys["d80"]})).json()]  # fmt: skip
    links = [LinkView.model_validate(x) for x in (await run.client.get(f"{mon}/v1/links")).json()]
    cluster = cluster_from_monitor(nodes, links, None, set())
    profile = run.profiles["d80"]
    rows = []
    for objective in ("latency", "throughput", "energy"):
        policy = QosPolicy(objective=objective, weight_format=FORMAT)
        req = plan_request(profile, cluster, policy, None, time_limit_s)
        body = req.model_dump_json()
        t0 = time.perf_counter()
        resp = await run.client.post(f"{run.stack.splitter_url}/v1/plan", content=body,
                                     headers={"content-type": "application/json"}, timeout=120)  # fmt: skip
        wall = time.perf_counter() - t0
        solver = resp.json().get("solver", {}) if resp.status_code == 200 else {}
        rows.append({"objective": objective, "nodes": len(cluster.nodes), "links": len(cluster.links),
                     "request_bytes": len(body), "wall_s": wall, "status": resp.status_code,
                     "solver_s": solver.get("time_s"), "optimal": solver.get("optimal"),
                     "gap": solver.get("gap")})  # fmt: skip
    return rows


async def rollout_figures(run: Run) -> list[dict]:
    """Every committed rollout: nodes touched (k) and seconds from creation to COMMIT."""
    resp = await run.client.get(f"{run.stack.broadcast_url}/v1/rollouts", params={"limit": 500})
    return [{"deployment": r["deployment"], "k": len(r["nodes"]), "prepare_s": r["prepare_s"],
             "to_commit_s": r["committed_at"] - r["created_at"]}
            for r in resp.json() if r.get("committed_at")]  # fmt: skip


def _profiles(root: Path) -> dict:
    from edgeorch.models import adapter_for, load_config

    out = {}
    for name, model in DEPLOYMENTS.items():
        adapter = adapter_for(load_config(root / model))
        out[name] = adapter.profile(model, context_tokens=512, weight_format=FORMAT)
    return out


def _start_stack(root: Path, log_dir: Path) -> LocalStack:
    # The fleet is simulated in this process: the stack starts no worker processes.
    scenario = Scenario.model_construct(description="simulated fleet (bench/scale.py)", workers=[])
    return LocalStack(scenario, model_store=root, log_dir=log_dir, private_redis=True,
                      jobs_worker=False, start_timeout_s=180).start()  # fmt: skip


async def measure(run: Run, n: int, args: argparse.Namespace) -> dict:
    """Join the fleet, deploy, then one churn window with its changes; the row for size ``n``."""
    rng = random.Random(args.seed + n)
    t_join = time.monotonic()
    await run.join(n, seed=args.seed)
    joined_s = time.monotonic() - t_join
    await asyncio.sleep(3.0)  # every node heartbeats at least twice before deploying
    from edgeorch.schemas.profile import profile_key

    for name, model in DEPLOYMENTS.items():
        resp = await run.client.post(f"{run.stack.orchestrator_url}/v1/deployments", json={
            "name": name, "model": model, "policy": {"weight_format": FORMAT}})  # fmt: skip
        resp.raise_for_status()
    first = {name: await wait_committed(run, name, None, None) for name in DEPLOYMENTS}
    settled_s = await settle(run)
    views = [await run.deployment(name) for name in DEPLOYMENTS]
    pids = {name: s.proc.pid for name, s in run.stack.services.items()}
    if run.stack.redis_server is not None:
        pids["redis"] = run.stack.redis_server.proc.pid
    pids["simulator"] = os.getpid()
    window, counters = ProcWindow(pids, flat=frozenset({"simulator"})), RedisCounters(run.stack.redis_url)
    window.start()
    await counters.start()
    stop = asyncio.Event()
    slowed = rng.sample(sorted(set(run.fleet.nodes) - run.plan_nodes(views)), max(1, n // 20))
    for node in slowed:
        run.fleet.slow(node, 2.0)
    sampler = asyncio.create_task(sample_until(window, stop))
    churner = asyncio.create_task(churn(run, n, stop, run.plan_nodes(views), rng))
    t0 = time.time()
    changes = []
    for i in range(args.changes):
        await asyncio.sleep(args.window_s / (args.changes + 1))
        # Each deployment's changes lie two intervals apart, past its policy's cooldown_s (10 s) at
        # the default window: a change inside the cooldown waits for it by design.
        kind = ("loss", "slowdown")[i // 2 % 2]
        changes.append(await change_to_commit(run, list(DEPLOYMENTS)[i % 2], kind, rng))
    await asyncio.sleep(max(0.0, args.window_s - (time.time() - t0)))
    t1 = time.time()
    stop.set()
    churned = await churner
    await sampler
    cpu, cpu_s = window.cpu_percent(), window.cpu_seconds()
    bus_rate, redis_rate = await counters.rates()
    await counters.close()
    alive = sum(1 for x in (await run.client.get(f"{run.stack.monitor_url}/v1/nodes",
                                                  params={"state": "alive"})).json())  # fmt: skip
    keys = {name: profile_key(model, FORMAT) for name, model in DEPLOYMENTS.items()}
    beats = beat_figures(run.fleet.beats, t0, t1, len(run.fleet.nodes), 1.0)
    return {
        # CPU per heartbeat does not depend on how many other processes share the cores, unlike CPU %.
        "monitor_cpu_ms_per_beat": 1e3 * cpu_s["monitor"] / max(1, beats["beats"]),
        "nodes": n, "join_s": joined_s, "first_commit_s": first, "settle_s": settled_s, "window_s": t1 - t0,
        "beats": beats,
        "cpu_percent": cpu, "peak_rss_bytes": window.peak_rss, "bus_msgs_per_s": bus_rate,
        "redis_cmds_per_s": redis_rate, "notifications": run.fleet.notifications,
        "churn": churned, "slowed": len(slowed), "changes": changes, "alive_at_end": alive,
        "planner": await planner_times(run, keys, args.plan_limit_s), "rollouts": await rollout_figures(run),
        "load_avg": os.getloadavg(),
    }  # fmt: skip


async def run_size(n: int, args: argparse.Namespace, root: Path, profiles: dict) -> dict:
    """Start a fresh control plane, measure size ``n``, stop everything."""
    stack = await asyncio.to_thread(_start_stack, root, Path(tempfile.mkdtemp(prefix=f"scale-{n}-")))
    # `kill -USR1 <pid>` prints where every task of the simulator waits (a stalled fleet, diagnosed live).
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _dump_tasks)
    try:
        sim = SimConfig(stack.monitor_url, stack.broadcast_url, stack.rollout_secret)
        fleet = SimFleet(FleetConfig(sim, stack.redis_url))
        await fleet.start()
        headers = {"authorization": f"Bearer {stack.admin_token}"}
        # Long: under load, creating a deployment (it profiles the model) took over 30 s.
        async with httpx.AsyncClient(headers=headers, timeout=180) as client:
            run = Run(stack, fleet, client)
            run.profiles = profiles
            try:
                # Bounded: a size that wedges (seen once, before the fixes) must not stall the rest.
                return await asyncio.wait_for(measure(run, n, args), MEASURE_TIMEOUT_S)
            finally:
                await fleet.stop()
    finally:
        await asyncio.to_thread(stack.stop)


def _dump_tasks() -> None:
    """Every task's innermost frame, counted (a thousand nodes' tasks print as a few lines)."""
    where = collections.Counter()
    for task in asyncio.all_tasks():
        stack = task.get_stack()
        where[
            " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in reversed(stack[-3:])) or "(no frame)"
        ] += 1
    for line, count in where.most_common(20):
        print(f"{count:6d} {line}", file=sys.stderr, flush=True)


def _measure_sizes(sizes: list[int], args: argparse.Namespace) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="scale-store-"))
    write_sim_models(root, STORE / "smollm2-135m")
    profiles = _profiles(root)
    rows = []
    for n in sizes:
        print(f"--- {n} simulated nodes", flush=True)
        rows.append(asyncio.run(run_size(n, args, root, profiles)))
        print(json.dumps(rows[-1], default=str), flush=True)  # one line per size: --from-log reads these
    return rows


def main(argv: list[str] | None = None) -> int:
    """Measure every size, print the table; write results unless --quick."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None, help="fleet sizes, comma separated (default 100,300,1000)")
    parser.add_argument("--window-s", type=float, default=None, help="churn window per size (default 60)")
    parser.add_argument("--changes", type=int, default=4, help="plan-node losses/slowdowns timed per size")
    parser.add_argument("--plan-limit-s", type=float, default=2.0, help="planner time limit per objective")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-log", type=Path, default=None,
                        help="write the results from the per-size lines an interrupted run printed")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="20 and 50 nodes, 20 s windows, write nothing")
    args = parser.parse_args(argv)
    # A TERM (timeout, CI) unwinds like Ctrl-C, so every process the stack started is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sizes = [int(s) for s in (args.sizes or ("20,50" if args.quick else "100,300,1000")).split(",")]
    args.window_s = args.window_s or (20.0 if args.quick else 60.0)
    if args.from_log:
        rows = [json.loads(line) for line in args.from_log.read_text().splitlines() if line.startswith("{")]
    else:
        rows = _measure_sizes(sizes, args)
    text = markdown(rows, args)
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "scale.json").write_text(
            json.dumps({"args": vars(args), "rows": rows}, indent=1, default=str)
        )
        (RESULTS / "scale.md").write_text(text + "\n")
        plot(rows, RESULTS / "scale.svg")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
