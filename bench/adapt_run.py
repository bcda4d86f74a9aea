"""One strategy's run of an adaptation scenario: a fresh stack, the load, the timeline, the records.

``run_strategy`` starts a LocalStack with the scenario's workers (in a
network namespace each with ``network="netns"``), calibrates and deploys
``smol`` under the strategy's policy, drives closed-loop chat sessions
through the gateway while ``Run.apply_timeline`` makes the changes, and
returns every request, plan sample, timeline event and decision; the stack
is always stopped. ``bench.adapt`` runs it per strategy and round and turns
the records into results.
"""

from __future__ import annotations

import datetime
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.adapt_scenario import AdaptScenario, TimelineEvent, resolve_node
from edgeorch.local.stack import LocalStack
from edgeorch.local.up_command import calibrate
from edgeorch.schemas.profile import profile_key

MODEL, DEPLOYMENT = "smollm2-135m", "smol"
# A haiku runs past 24 tokens (a capital city ends in 8), so every request generates max_tokens.
MESSAGES = [{"role": "user", "content": "Write a haiku about the sea."}]
FAILED_BACKOFF_S = 0.5  # a client pauses after an error instead of hammering a broken chain
POLL_S = 0.5
LINK_POLL_S = 1.0
REQUEST_TIMEOUT_S = 120.0


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
        # [t_s, src, dst, bandwidth B/s, rtt s, samples] of every link the monitor reports, every LINK_POLL_S
        self.link_samples: list[list] = []
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

    def poll_links(self) -> None:
        """The monitor's link estimates every LINK_POLL_S: what each plan decision was made on."""
        while not self.stop.is_set():
            try:
                links = httpx.get(f"{self.stack.monitor_url}/v1/links", timeout=10).json()
                t = round(self.now(), 2)
                with self.lock:
                    self.link_samples.extend([t, lk["src"], lk["dst"], lk["bandwidth_bytes_per_s"], lk["rtt_s"],
                                              lk["samples"]] for lk in links)  # fmt: skip
            except (httpx.HTTPError, ValueError) as exc:
                log(f"  link poll failed: {exc!r}")
            self.stop.wait(LINK_POLL_S)

    def session(self, index: int, max_tokens: int, messages: list[dict] = MESSAGES) -> None:
        """One closed-loop chat session: the next request as soon as the last one is answered."""
        body = {"model": DEPLOYMENT, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
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
                                   prompt_tokens=out["usage"]["prompt_tokens"],
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
        if event.node == "@all":  # every running node, one after the other
            return {"node": node, "each": [self.emulate(n, event) for n in node.split(",")]}
        return {"node": node, **self.emulate(node, event)}

    def emulate(self, node: str, event: TimelineEvent) -> dict:
        """A slowdown or link event on one node: the worker's emulation, or the kernel's cap on its uplink."""
        worker = self.stack.worker(node).url
        emu = httpx.get(f"{worker}/v1/admin/emulation", timeout=10).json()
        shaped = None
        if event.kind == "slowdown":
            emu["slowdown"] = event.factor
        else:
            bandwidth = event.bandwidth_mbps
            if bandwidth is not None and self.stack.testbed is not None:
                # The kernel shapes it, not the worker.
                self.stack.set_uplink(node, bandwidth)
                shaped, bandwidth = self.stack.testbed.uplink(node), None
            emu.update({k: v for k, v in (("bandwidth_mbps", bandwidth), ("rtt_ms", event.rtt_ms))
                        if v is not None})  # fmt: skip
        r = httpx.post(f"{worker}/v1/admin/emulation", json=emu, headers=self.headers, timeout=10)
        r.raise_for_status()
        return {"emulation": r.json(), **({"tbf": shaped} if shaped else {})}


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
        if e["kind"] in ("deploy", "remap", "resplit", "reformat", "recover"):
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
        threads = [
            threading.Thread(target=run.poll_plan, daemon=True),
            threading.Thread(target=run.poll_links, daemon=True),
        ]
        messages = prompt_messages(scenario.prompt_tokens)
        threads += [threading.Thread(target=run.session, args=(i, scenario.max_tokens, messages), daemon=True)
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
        out["bytes_out"] = stage_bytes_out(stack)
        out.update(requests=sorted(run.requests, key=lambda r: r["start_s"]), plan_samples=run.plan_samples,
                   link_samples=run.link_samples,
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


QUALITY_TEXT = Path(__file__).resolve().parent / "data" / "quality_text.txt"
WORDS_PER_TOKEN = (
    0.75  # English prose in SmolLM2's tokenizer, roughly; the answer's usage says the exact count
)


def prompt_messages(prompt_tokens: int | None) -> list[dict]:
    """The chat every session sends: the haiku request, or a long one of about ``prompt_tokens`` tokens."""
    if prompt_tokens is None:
        return MESSAGES
    words = QUALITY_TEXT.read_text(encoding="utf-8").split()[: max(1, int(prompt_tokens * WORDS_PER_TOKEN))]
    return [{"role": "user", "content": "Summarise this text in one line.\n\n" + " ".join(words)}]


_BYTES_OUT = re.compile(r'^edgeorch_worker_bytes_out_total\{stage="([^"]+)"\} ([0-9.e+]+)$', re.M)


def stage_bytes_out(stack: LocalStack) -> dict[str, float]:
    """Frame bytes each stage sent to the next one over the run (the workers' own counters)."""
    out: dict[str, float] = {}
    for w in stack.workers:
        try:
            text = httpx.get(f"{w.url}/metrics", timeout=10).text
        except httpx.HTTPError as exc:  # a killed worker's bytes are lost, and said so
            log(f"  no metrics from {w.name}: {exc!r}")
            continue
        out.update({sid: float(v) for sid, v in _BYTES_OUT.findall(text)})
    return out


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
