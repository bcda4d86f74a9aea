"""Spot checks under steady load: false positives on honest nodes, then how fast a tampering node is found.

Run: ``python -m bench.spot_checks [--model tiny-llama] [--share 0.02] [--honest-s 240] [--tamper-s 90]``.
Writes ``bench/results/spot_checks.json`` and ``spot_checks.md`` (also printed).

A local stack of three workers: node-t trusted, node-u1 and node-u2 not; the
deployment may use only the untrusted two, so every step is on untrusted
nodes and ``--share`` of them is recomputed on node-t. ``--clients`` threads
send greedy, non-streamed completions of a fixed set of prompts back to back
the whole time (steady load).

1. *Reference*: each prompt once before anything else (honest nodes); every
   later answer must equal it.
2. *Honest*: ``--honest-s`` seconds of load; every failed check is a false
   positive.
3. *Tampering*: the node hosting the most units of the current plan turns on
   ``perturb`` (the worker's admin-only emulation switch) under the load;
   measured: seconds to the failed check's event (detection), seconds to a
   committed plan without that node, and whether every answer completed
   afterwards equals its reference (answers refused meanwhile are counted
   apart: an error is not a wrong answer, but it is not an answer either).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import httpx

from edgeorch.local.scenario import Scenario, WorkerSpec
from edgeorch.local.stack import LocalStack
from edgeorch.local.up_command import calibrate, wait_ready

TOKEN = "bench-spot-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPTS = ["The capital of France is", "Edge devices are", "One, two, three,", "Once upon a time",
           "The weather today", "In a distributed system,", "My favourite food is", "Water boils at"]  # fmt: skip


class Load:
    """``clients`` threads sending completions back to back; every result kept with its times."""

    def __init__(self, url: str, clients: int, max_tokens: int):
        self.url, self.max_tokens = url, max_tokens
        self.results: list[dict] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        with httpx.Client(timeout=300) as client:
            n = i
            while not self._stop.is_set():
                prompt = PROMPTS[n % len(PROMPTS)]
                n += 1
                t0 = time.time()
                body = {"model": "checked", "prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0}
                try:
                    resp = client.post(f"{self.url}/v1/completions", json=body, headers=AUTH)
                    text = resp.json()["choices"][0]["text"] if resp.status_code == 200 else None
                    err = None if resp.status_code == 200 else f"{resp.status_code} {resp.text[:200]}"
                except httpx.HTTPError as exc:
                    text, err = None, repr(exc)
                with self._lock:
                    self.results.append({"prompt": prompt, "start": t0, "end": time.time(), "text": text,
                                         "error": err})  # fmt: skip

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=300)


def _checks(client: httpx.Client, url: str) -> dict:
    return client.get(f"{url}/v1/spot-checks").json()


def _summary(results: list[dict], reference: dict[str, str]) -> dict:
    done = [r for r in results if r["text"] is not None]
    wrong = [r for r in done if r["text"] != reference[r["prompt"]]]
    return {"completed": len(done), "wrong": len(wrong), "errors": len(results) - len(done),
            "error_samples": sorted({r["error"][:120] for r in results if r["error"]})[:3]}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    """The three phases on one fresh stack."""
    scenario = Scenario(workers=[WorkerSpec(id="node-t", trusted=True), WorkerSpec(id="node-u1"),
                                 WorkerSpec(id="node-u2")])  # fmt: skip
    env = {"EDGEORCH_SPOT_CHECK_SHARE": repr(args.share), "EDGEORCH_SPOT_CHECK_HOLD_S": repr(args.hold_s)}
    out: dict = {"model": args.model, "share": args.share, "clients": args.clients, "max_tokens": args.max_tokens,
                 "perturb": args.perturb, "hold_s": args.hold_s, "load_avg_1m": [os.getloadavg()[0]]}  # fmt: skip
    with LocalStack(scenario, admin_token=TOKEN, jobs_worker=False, service_env=env, start_timeout_s=300) as stack, \
            httpx.Client(timeout=300) as client:  # fmt: skip
        url = stack.orchestrator_url
        calibrate(client, stack.monitor_url, TOKEN, args.model, [w.name for w in stack.workers], 180)
        resp = client.post(f"{url}/v1/deployments", headers=AUTH, json={
            "name": "checked", "model": args.model, "policy": {"nodes": ["node-u1", "node-u2"]}})  # fmt: skip
        resp.raise_for_status()
        wait_ready(client, url, "checked", 300, stack.log_dir)
        reference = {}
        for p in PROMPTS:
            body = {"model": "checked", "prompt": p, "max_tokens": args.max_tokens, "temperature": 0}
            reference[p] = client.post(f"{url}/v1/completions", json=body, headers=AUTH).json()["choices"][0][
                "text"
            ]

        load = Load(url, args.clients, args.max_tokens)
        load.start()
        t_honest = time.time()
        time.sleep(args.honest_s)
        honest = _checks(client, url)
        t_switch = time.time()
        out["honest"] = {"seconds": t_switch - t_honest, "counts": honest["counts"], "suspects": honest["suspects"],
                         **_summary([r for r in load.results if r["end"] <= t_switch], reference)}  # fmt: skip

        plan = client.get(f"{url}/v1/deployments/checked").json()
        units: dict[str, int] = {}
        for s in plan["stages"]:
            units[s["node"]] = units.get(s["node"], 0) + s["end"] - s["start"]
        tamperer = max(units, key=units.get)
        client.post(f"{stack.worker(tamperer).url}/v1/admin/emulation", json={"perturb": args.perturb},
                    headers=AUTH).raise_for_status()  # fmt: skip
        t_switch = time.time()
        detected = replanned = None
        while time.time() - t_switch < args.tamper_s:
            if detected is None:
                events = client.get(f"{url}/v1/events", params={"deployment": "checked"}).json()
                hit = next((e for e in events if e["kind"] == "spot_check_failed"), None)
                detected = hit["ts"] - t_switch if hit else None
            if replanned is None:
                v = client.get(f"{url}/v1/deployments/checked").json()
                if v["state"] == "ready" and all(s["node"] != tamperer for s in v["stages"]):
                    replanned = time.time() - t_switch
            if detected is not None and replanned is not None and time.time() - t_switch > replanned + 20:
                break
            time.sleep(0.2)
        load.stop()
        state = _checks(client, url)
        after = [r for r in load.results if r["start"] >= t_switch - 1e-3 or r["end"] > t_switch]
        out["tamper"] = {"node": tamperer, "units": units, "detected_s": detected, "replanned_s": replanned,
                         "counts_at_end": state["counts"], "suspects": list(state["suspects"]),
                         "finished_across_or_after": _summary(after, reference),
                         "started_after_replan": _summary([r for r in after if replanned is not None
                                                           and r["start"] >= t_switch + replanned], reference)}  # fmt: skip
        out["all_answers"] = _summary(load.results, reference)
    out["load_avg_1m"].append(os.getloadavg()[0])
    return out


def markdown(r: dict) -> str:
    """The result as Markdown tables."""
    h, t = r["honest"], r["tamper"]
    c = h["counts"]
    fa, sa = t["finished_across_or_after"], t["started_after_replan"]

    def secs(x: float | None) -> str:
        return "not within the run" if x is None else f"{x:.1f} s"

    return "\n".join([
        f"## Spot checks: {r['model']}, share {r['share']:g}, hold {r['hold_s']:g} s, {r['clients']} clients x "
        f"{r['max_tokens']} tokens",
        "",
        f"1-minute load average {r['load_avg_1m'][0]:.1f} before, {r['load_avg_1m'][1]:.1f} after.",
        "",
        "| phase | measure | value |",
        "| --- | --- | ---: |",
        f"| honest ({h['seconds']:.0f} s) | steps sampled / forced by held answers / compared / passed / failed "
        f"(false positives) | {c.get('sampled', 0)} / {c.get('forced', 0)} / {c.get('checked', 0)} / "
        f"{c.get('passed', 0)} / {c.get('failed', 0)} |",
        f"| honest | answers completed / wrong / errors | {h['completed']} / {h['wrong']} / {h['errors']} |",
        f"| tampering ({t['node']}, perturb {r['perturb']:g}) | failed check's event after the switch | "
        f"{secs(t['detected_s'])} |",
        f"| tampering | plan without {t['node']} committed after the switch | {secs(t['replanned_s'])} |",
        f"| tampering | answers finished after the switch: completed / wrong / errors | "
        f"{fa['completed']} / {fa['wrong']} / {fa['errors']} |",
        f"| tampering | answers started after the re-plan: completed / wrong / errors | "
        f"{sa['completed']} / {sa['wrong']} / {sa['errors']} |",
        "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Measure, write JSON and Markdown under --out-dir, print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--share", type=float, default=0.02, help="share of steps checked (default 0.02)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--perturb", type=float, default=0.1, help="tampering noise, relative to the output's RMS")
    p.add_argument(
        "--hold-s",
        type=float,
        default=2.0,
        help="EDGEORCH_SPOT_CHECK_HOLD_S: hold whole answers until a later check passed (0: off)",
    )
    p.add_argument("--honest-s", type=float, default=240.0, help="seconds of honest load (default 240)")
    p.add_argument("--tamper-s", type=float, default=90.0, help="seconds to wait for detection (default 90)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    result = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "spot_checks.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (args.out_dir / "spot_checks.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
