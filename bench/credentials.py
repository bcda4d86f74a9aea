"""What the data-plane credential costs per hop: the same chain with and without stage credentials.

Run: ``python -m bench.credentials [--steps 200] [--model tiny-llama]``.
Writes ``bench/results/credentials.json`` and ``credentials.md`` (also printed).

Two measurements, side by side:

- in process, the work a credential adds to one hop: the sender builds the
  header, the stage looks it up and compares it in constant time (many
  repetitions, so the figure is precise);
- end to end, two identical 3-stage chains of the model on the same three
  workers, one open and one with a credential on every stage, stepped
  alternately token by token (so load drifts hit both alike); the per-hop
  figure is the median of the paired step differences divided by the 3 hops.
  On a shared machine that difference is dominated by noise of ±tens of µs;
  the in-process figure is the one to hold against the 0.05 ms target.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from pathlib import Path

import torch

from edgeorch.local.chain import load_chain
from edgeorch.local.launcher import LocalWorkers
from edgeorch.schemas.stage import Sampling
from edgeorch.security.credentials import CREDENTIAL_HEADER, credential_headers, credential_ok, new_credential
from edgeorch.transport import protocol
from edgeorch.transport.client import ChainClient

RANGES = {"tiny-llama": [(0, 2), (2, 4), (4, 6)], "smollm2-135m": [(0, 11), (11, 21), (21, 32)]}
HOPS = 3


def in_process_us(repeats: int = 200_000) -> dict[str, float]:
    """Microseconds per hop for the sender's header and the stage's check, with and without a credential."""
    credential = new_credential()
    out = {}
    for name, cred in (("open", None), ("credential", credential)):
        t0 = time.perf_counter()
        for _ in range(repeats):
            headers = {**protocol.FRAME_HEADERS, **credential_headers(cred)}
            credential_ok(cred, headers.get(CREDENTIAL_HEADER))
        out[name] = 1e6 * (time.perf_counter() - t0) / repeats
    out["added"] = out["credential"] - out["open"]
    return out


def paired_steps(clients: dict[str, ChainClient], steps: int) -> dict[str, list[float]]:
    """Decode ``steps`` tokens on every chain, alternating chains each token; wall seconds per step."""
    walls: dict[str, list[float]] = {name: [] for name in clients}
    sessions = {name: uuid.uuid4().hex for name in clients}
    tokens = {name: torch.tensor([[1, 50, 60]]) for name in clients}
    position = {name: 0 for name in clients}
    for i in range(steps + 1):
        order = list(clients) if i % 2 else list(reversed(clients))
        for name in order:
            x = tokens[name]
            res = clients[name].step({"x": x}, session=sessions[name], position=position[name], mode="generate",
                                     sampling=Sampling().model_dump(), release=i == steps)  # fmt: skip
            position[name] += x.shape[1]
            tokens[name] = torch.tensor([[int(res.frame.meta["token"])]])
            if i > 0:  # the prefill is not a decode hop
                walls[name].append(res.wall_s)
    return walls


def run(model: str, steps: int) -> dict:
    """Both measurements for ``model``; the end-to-end one on three fresh workers."""
    ranges = RANGES[model]
    credential = new_credential()
    with LocalWorkers(len(ranges), threads=1) as workers:
        ids = {"open": load_chain(workers, model, ranges, prefix="open"),
               "credential": load_chain(workers, model, ranges, prefix="cred", credential=credential)}  # fmt: skip
        clients = {"open": ChainClient(workers.workers[0].url, ids["open"][0]),
                   "credential": ChainClient(workers.workers[0].url, ids["credential"][0], credential=credential)}  # fmt: skip
        try:
            walls = paired_steps(clients, steps)
        finally:
            for c in clients.values():
                c.close()
    diffs = [c - o for c, o in zip(walls["credential"], walls["open"], strict=True)]
    return {
        "model": model, "stages": len(ranges), "steps": steps, "load_avg_1m": os.getloadavg()[0],
        "in_process_us": in_process_us(),
        "step_ms": {k: 1000 * statistics.median(v) for k, v in walls.items()},
        "added_per_hop_ms": 1000 * statistics.median(diffs) / HOPS,
    }  # fmt: skip


def markdown(r: dict) -> str:
    """The result as a Markdown table."""
    ip = r["in_process_us"]
    return "\n".join([
        f"## Data-plane credentials: {r['model']}, {r['stages']} stages on loopback",
        "",
        f"{r['steps']} decode steps per chain, alternating; 1-minute load average {r['load_avg_1m']:.1f}.",
        "",
        "| measure | open | with credential | added per hop |",
        "| --- | ---: | ---: | ---: |",
        f"| header + check, in process (µs) | {ip['open']:.2f} | {ip['credential']:.2f} | {ip['added']:.2f} µs |",
        f"| decode step, end to end (ms, median) | {r['step_ms']['open']:.3f} | {r['step_ms']['credential']:.3f} "
        f"| {r['added_per_hop_ms']:.3f} ms (median paired difference / {HOPS}) |",
        "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Measure, write JSON and Markdown under --out-dir, print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(RANGES), default="tiny-llama")
    p.add_argument("--steps", type=int, default=200, help="decode steps per chain (default 200)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    result = run(args.model, args.steps)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "credentials.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (args.out_dir / "credentials.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
