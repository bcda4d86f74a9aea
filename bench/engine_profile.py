"""Where a decode step of the lean engine spends its time, per op, and how fast its matmuls read their weights.

Run: ``python -m bench.engine_profile --model tinyllama-synth --formats int4,int8 --threads 2``.

For each format: the whole model as one stage, a short prompt, then
``--steps`` decode steps under ``torch.profiler`` (CPU time per op, summed
over the steps, divided by the steps). The matmul kernels' share and the
bytes they read per token give their effective read rate, printed beside the
machine's measured streaming read bandwidth (bench/engine_roofline.py): a
kernel far below it is compute-bound, not memory-bound. Prints a Markdown
table per format; nothing is written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.engine_roofline import engine_read_bytes, read_bandwidth
from edgeorch.engine.stage import load_stage
from edgeorch.models import load_config
from edgeorch.models.adapter import StageInput
from edgeorch.models.store import ModelStore
from edgeorch.service.settings import CommonSettings

MATMULS = (
    "aten::_weight_int4pack_mm_for_cpu",
    "aten::_weight_int8pack_mm",
    "aten::mm",
    "aten::addmm",
    "aten::linear",
)


def decode_profile(model_dir: Path, fmt: str, steps: int, prompt: int = 32) -> dict:
    """Per-op self CPU ms per decode step, the step's wall ms, and the bytes the step's weights take."""
    units = load_config(model_dir).num_hidden_layers + 2
    stage = load_stage(model_dir, 0, units, engine="lean", weight_format=fmt)
    cache, x, pos = stage.new_cache(), torch.arange(1, prompt + 1).unsqueeze(0), 0
    with torch.inference_mode():
        for _ in range(3):  # prefill and warm-up steps
            logits = stage.run(StageInput(x, position=pos), cache)
            cache.advance(x.shape[1])
            pos += x.shape[1]
            x = logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                logits = stage.run(StageInput(x, position=pos), cache)
                cache.advance(1)
                pos += 1
                x = logits[:, -1:].argmax(-1)
        wall = (time.perf_counter() - t0) / steps
    ops: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for e in prof.key_averages():
        ops[e.key] += e.self_cpu_time_total / 1e3 / steps
        counts[e.key] += e.count // steps
    return {"format": fmt, "wall_ms": 1e3 * wall, "ops_ms": dict(ops), "calls": dict(counts),
            "read_bytes": engine_read_bytes(stage)}  # fmt: skip


def table(p: dict, bandwidth: float, top: int) -> list[str]:
    """One format's profile as Markdown."""
    total = sum(p["ops_ms"].values())
    mm = sum(ms for op, ms in p["ops_ms"].items() if op in MATMULS)
    lines = [
        f"### {p['format']}: {p['wall_ms']:.1f} ms per decode step (profiled; op self time sums to {total:.1f})",
        "",
        f"Weights read per token {p['read_bytes'] / 1e6:.0f} MB; matmul kernels {mm:.1f} ms → "
        f"{p['read_bytes'] / (mm / 1e3) / 1e9:.2f} GB/s effective against a streaming read of "
        f"{bandwidth / 1e9:.1f} GB/s; everything else {total - mm:.1f} ms "
        f"({sum(c for op, c in p['calls'].items() if op not in MATMULS)} op calls per step).",
        "",
        "| op | ms per step | calls per step | share |",
        "|---|---:|---:|---:|",
    ]
    for op, ms in sorted(p["ops_ms"].items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {op} | {ms:.2f} | {p['calls'][op]} | {ms / total:.1%} |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    """Profile each format at one thread count and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--store", type=Path, default=None)
    ap.add_argument("--formats", default="fp32,int8,int4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = ModelStore(args.store or CommonSettings().model_store).path(args.model)
    bandwidth = read_bandwidth(args.threads)
    lines = [f"## {args.model}, {args.threads} thread(s), load {os.getloadavg()[0]:.1f}", ""]
    for fmt in args.formats.split(","):
        lines += table(decode_profile(model_dir, fmt.strip(), args.steps), bandwidth, args.top)
    lines.append(f"1-minute load average at the end: {os.getloadavg()[0]:.1f}.")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
