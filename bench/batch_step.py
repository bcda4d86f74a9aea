"""One stage's decode step over a batch of sessions, in process: what batching buys before any hop.

Loads SmolLM2 (lean engine, a format) as one stage, prefills N sessions of
different prompt lengths, then times ``LoadedStage.run_rows`` over the N
sessions' next tokens (each session on its own cache) against N single
steps one after the other, side by side in one run, rounds interleaved so
drifting load hits both alike.

    python -m bench.batch_step --batches 1,2,4,8,16 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from edgeorch.engine.stage import load_stage
from edgeorch.models.adapter import StageInput
from edgeorch.models.store import ModelStore
from edgeorch.service.settings import CommonSettings

RESULTS = Path(__file__).parent / "results"


def _sessions(stage, n: int) -> tuple[list, list[StageInput]]:
    caches, inputs = [], []
    for i in range(n):
        ids = list(range(1, 6 + 3 * i))  # contexts of different lengths
        cache = stage.new_cache()
        stage.run(StageInput(x=torch.tensor([ids])), cache)
        cache.advance(len(ids))
        caches.append(cache)
        inputs.append(StageInput(x=torch.tensor([[7]]), position=len(ids)))
    return caches, inputs


def _time_pair(first, second, rounds: int) -> tuple[float, float]:
    """Median seconds of each function, rounds alternating (each call rewrites the same cache slot)."""
    a, b = [], []
    for _ in range(rounds):
        for fn, out in ((first, a), (second, b)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


def main() -> None:
    """Print a Markdown table: per batch size, batched vs one-by-one step time and their ratio."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--format", default="fp32")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = ModelStore(Path(CommonSettings().model_store)).path("smollm2-135m")
    probe = load_stage(model_dir, 0, 1, engine="lean", weight_format=args.format)
    stage = load_stage(model_dir, 0, probe.adapter.num_units, engine="lean", weight_format=args.format)
    rows = []
    head = "| batch | batched ms | one by one ms | batched tok/s | speed-up | load avg |\n|---:|---:|---:|---:|---:|---:|"
    title = f"SmolLM2 {args.format}, whole model as one stage, {args.threads} thread(s)"
    print(f"{title}\n{head}")
    for n in (int(b) for b in args.batches.split(",")):
        caches, inputs = _sessions(stage, n)
        batched, alone = _time_pair(
            lambda inputs=inputs, caches=caches: stage.run_rows(inputs, caches),
            lambda inputs=inputs, caches=caches: [
                stage.run(i, c) for i, c in zip(inputs, caches, strict=True)
            ],
            args.rounds,
        )
        row = {"batch": n, "batched_s": batched, "one_by_one_s": alone, "tok_per_s": n / batched,
               "speedup": alone / batched, "load_avg": os.getloadavg()[0]}  # fmt: skip
        rows.append(row)
        print(f"| {n} | {batched * 1e3:.1f} | {alone * 1e3:.1f} | {n / batched:.1f} | {alone / batched:.2f} "
              f"| {row['load_avg']:.1f} |", flush=True)  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "batch_step.json").write_text(json.dumps(rows, indent=1))
    lines = [f"| {r['batch']} | {r['batched_s'] * 1e3:.1f} | {r['one_by_one_s'] * 1e3:.1f} | {r['tok_per_s']:.1f} "
             f"| {r['speedup']:.2f} | {r['load_avg']:.1f} |" for r in rows]  # fmt: skip
    (RESULTS / "batch_step.md").write_text(
        f"# Decode batch on one stage: {title}\n\n{head}\n" + "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    main()
