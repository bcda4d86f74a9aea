"""What lossy activation hops cost in quality and save in bytes: `python -m bench.activation_quality`.

The model runs in-process as a chain of stages (``--split``, e.g. three
stages: two hops) over ``bench/data/quality_text.txt`` in one teacher-forced
prefill; at every hop the hidden states go through the activation format's
pack and restore (``edgeorch/transport/compression.py``), exactly what a
worker's hop does. Per format: top-1 agreement with fp32 hops, perplexity
and its change, bytes per token on a hop, and the measured conversion time
(pack + restore, per element). The quality budget of issue 21 is top-1
agreement >= 0.99 and perplexity within 1 %.

Run: ``python -m bench.activation_quality [--model smollm2-135m] [--split 0:11,11:21,21:32]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from edgeorch.engine.quality import compare, score_text
from edgeorch.engine.stage import LoadedStage, load_stage
from edgeorch.local.chain import parse_stages
from edgeorch.models import adapter_for, load_config
from edgeorch.models.adapter import StageInput
from edgeorch.models.store import ModelStore
from edgeorch.models.tokenizer import load_tokenizer
from edgeorch.service.settings import CommonSettings
from edgeorch.transport import compression

QUALITY_TEXT = Path(__file__).resolve().parent / "data" / "quality_text.txt"


class HoppedChain:
    """Stages run one after the other, the hidden states crossing each hop in ``fmt``."""

    def __init__(self, stages: list[LoadedStage], fmt: str):
        self.stages, self.fmt = stages, fmt

    def run(self, inp: StageInput, cache=None) -> torch.Tensor:
        """The chain's output for ``inp`` (no cache: a teacher-forced pass)."""
        h = inp.x
        for i, stage in enumerate(self.stages):
            if i:
                tensors = compression.pack(h, self.fmt)
                compression.restore(tensors)
                h = tensors["x"]
            h = stage.run(StageInput(x=h, logits=inp.logits), None)
        return h


def convert_s_per_element(fmt: str, hidden: int, tokens: int = 512, repeats: int = 20) -> float:
    """Median time of pack + restore of ``tokens`` hidden states, per element, on one thread."""
    x = torch.randn(1, tokens, hidden)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a hop converts on a worker's event loop; threads only fight there
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tensors = compression.pack(x, fmt)
        compression.restore(tensors)
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return sorted(times)[len(times) // 2] / x.numel()


def main(argv: list[str] | None = None) -> int:
    """Score every format, print the table, write bench/results/activation_quality.{json,md}."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--split", default="0:11,11:21,21:32")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    model_dir = ModelStore(CommonSettings().model_store).path(args.model)
    adapter = adapter_for(load_config(model_dir))
    ranges = parse_stages(args.split, adapter.num_units)
    stages = [load_stage(model_dir, a, b, engine="lean") for a, b in ranges]
    ids = load_tokenizer(model_dir)(QUALITY_TEXT.read_text())["input_ids"]
    hidden = adapter.hidden_size
    ref = score_text(HoppedChain(stages, "fp32"), ids)
    rows = []
    for fmt in compression.ACTIVATION_FORMATS:
        q = compare(ref, score_text(HoppedChain(stages, fmt), ids))
        ok = q.top1_agreement >= 0.99 and abs(q.perplexity_change) <= 0.01
        rows.append({"format": fmt, **q.as_dict(), "bytes_per_token": compression.bytes_per_token(fmt, hidden),
                     "convert_s_per_element": convert_s_per_element(fmt, hidden), "meets_budget": ok})  # fmt: skip
    lines = [
        f"Activation formats on {len(ranges) - 1} hops of {args.model} ({len(ids)} tokens of quality_text.txt)",
        "",
        "| format | top-1 agreement | perplexity | change | bytes/token/hop | pack+restore ns/element | budget |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['top1_agreement']:.4f} | {r['perplexity']:.3f} | "
            f"{100 * r['perplexity_change']:+.2f} % | {r['bytes_per_token']} | "
            f"{1e9 * r['convert_s_per_element']:.2f} | {'met' if r['meets_budget'] else 'NOT met'} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "activation_quality.json").write_text(json.dumps(rows, indent=1))
    (args.out / "activation_quality.md").write_text(table)
    return 0 if all(r["meets_budget"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
