"""What splitting costs: the unsplit model against 1- to 4-stage chains on loopback.

Run: ``python -m bench.overhead [--rounds 4] [--new-tokens 64] [--configs A,B]`` (``make bench-overhead``).
The report itself is built by :mod:`bench.overhead_markdown`.
Writes ``bench/results/overhead.json`` and ``overhead.md`` (also printed).

Absolute times on a shared machine drift, so every figure that matters is a
ratio to the unsplit model measured in the same round: within a round the
variants' generations advance one token each in turn, and each figure is a
median over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.overhead_markdown import THREAD_CHAIN, UNSPLIT, idle_name, markdown
from edgeorch.engine import ENGINES, FORMATS
from edgeorch.engine.stage import load_stage
from edgeorch.local.chain import load_chain, parse_stages
from edgeorch.local.launcher import LocalWorkers
from edgeorch.models import adapter_for, load_config
from edgeorch.models.adapter import StageInput
from edgeorch.models.store import ModelStore
from edgeorch.runtime.sampling import sample_token
from edgeorch.schemas.stage import Sampling
from edgeorch.service.settings import CommonSettings
from edgeorch.transport.client import ChainClient

# Torch threads per process: A keeps the active thread count equal to the
# unsplit run's (only one stage computes at a time in single-session decode);
# B is the 1-thread-each comparison llama.cpp's RPC figure uses.
THREAD_CONFIGS = {"A": 2, "B": 1}
STAGE_COUNTS = (1, 2, 3, 4)
PROMPT = "Explain in a few paragraphs why the sky is blue and why sunsets are red."
# Plain text, long enough to cut an exactly-N-token prefill prompt from.
PREFILL_TEXT = " ".join(["Edge devices split a language model by layers and pass activations along."] * 40)
HOP_KEYS = ("decode_compute_ms", "decode_local_ms", "decode_link_ms", "decode_queue_ms",
            "prefill_compute_ms", "prefill_link_ms")  # fmt: skip


def even_ranges(num_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Unit ranges giving each stage an equal share of layers (earlier stages take the remainder).

    The embedding rides with the first stage and the head with the last, as in
    any split that keeps token ids and logits at the ends of the chain.
    """
    sizes = [num_layers // n_stages + (1 if k < num_layers % n_stages else 0) for k in range(n_stages)]
    ends, end = [], 1  # unit 0 is the embedding
    for size in sizes:
        end += size
        ends.append(end)
    ends[-1] = num_layers + 2
    starts = [0, *ends[:-1]]
    return list(zip(starts, ends, strict=True))


@dataclass
class Step:
    """One timed step: the token it produced and, for chains, what each stage reported."""

    token: int
    wall_s: float
    hops: list[dict] = field(default_factory=list)
    bytes_sent: int = 0


class EngineVariant:
    """The unsplit reference: edgeorch's own stage engine over all units, in process, no HTTP."""

    name = UNSPLIT
    ranges = None

    def __init__(self, model_dir: Path, num_units: int, engine: str = "lean", weight_format: str = "fp32"):
        self.stage = load_stage(model_dir, 0, num_units, engine=engine, weight_format=weight_format)

    def steps(self, prompt_ids: list[int], n_tokens: int) -> Iterator[Step]:
        """Greedy decoding, one timed step per token (the first step is the prefill)."""
        cache, x, position = self.stage.new_cache(), torch.tensor([prompt_ids]), 0
        for _ in range(n_tokens):
            t0 = time.perf_counter()
            h = self.stage.run(StageInput(x, position=position), cache)
            cache.advance(x.shape[1])
            token = sample_token(h, Sampling(), position + x.shape[1] - 1)
            yield Step(token, time.perf_counter() - t0)
            position += x.shape[1]
            x = torch.tensor([[token]])


class IdleEngineVariant:
    """The unsplit engine again (the same loaded stage), but idle for a while before every decode step.

    A stage of a chain sits idle while the others compute. Whether a step
    after an idle spell computes at another speed (on a VM whose idle vCPUs
    halt, it may) is measured here in the same run, with no split and no HTTP.
    """

    ranges = None

    def __init__(self, engine: EngineVariant, idle_s: float):
        self.engine, self.idle_s = engine, idle_s
        self.name = idle_name(idle_s)

    def steps(self, prompt_ids: list[int], n_tokens: int) -> Iterator[Step]:
        """EngineVariant's steps; the idle time before each is not timed."""
        for step in self.engine.steps(prompt_ids, n_tokens):
            yield step
            time.sleep(self.idle_s)


class HFVariant:
    """Hugging Face's model as a second reference: the loop generate() runs, timed per step."""

    name = "Hugging Face model"
    ranges = None

    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    def steps(self, prompt_ids: list[int], n_tokens: int) -> Iterator[Step]:
        """Greedy decoding with a DynamicCache; logits only for the last position, as generate() does."""
        from transformers import DynamicCache

        cache, x = DynamicCache(config=self.model.config), torch.tensor([prompt_ids])
        for _ in range(n_tokens):
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = self.model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1)
            token = int(torch.argmax(out.logits[0, -1].float()))
            yield Step(token, time.perf_counter() - t0)
            x = torch.tensor([[token]])

    @torch.inference_mode()
    def generate_api_tokens(self, prompt_ids: list[int], n_tokens: int) -> list[int]:
        """The tokens of ``generate(do_sample=False)``, to check the timed loop against."""
        x = torch.tensor([prompt_ids])
        mask = torch.ones_like(x)
        out = self.model.generate(x, attention_mask=mask, do_sample=False, max_new_tokens=n_tokens)
        return out[0, len(prompt_ids) :].tolist()


class ChainVariant:
    """A chain of stages on the local workers, driven through its entry stage over HTTP."""

    def __init__(self, ranges: list[tuple[int, int]], client: ChainClient, name: str | None = None):
        self.name = name or f"{len(ranges)}-stage chain"
        self.ranges = ranges
        self.client = client

    def steps(self, prompt_ids: list[int], n_tokens: int) -> Iterator[Step]:
        """ChainClient.generate's loop (greedy, no stop ids, release on the last step), one step at a time."""
        session, x, position = uuid.uuid4().hex, torch.tensor([prompt_ids]), 0
        for i in range(n_tokens):
            res = self.client.step({"x": x}, session=session, position=position, mode="generate",
                                   sampling=Sampling().model_dump(), release=i == n_tokens - 1)  # fmt: skip
            token = int(res.frame.meta["token"])
            yield Step(token, res.wall_s, res.hops, res.bytes_sent)
            position += x.shape[1]
            x = torch.tensor([[token]])


def step_breakdown(wall_s: float, hops: list[dict]) -> dict[str, list[float]]:
    """Split one chain step's wall time: compute, in-worker overhead, and the link to each stage.

    link[0] is the entry (wall − stage 0's handler time); link[i] is
    stage i−1's downstream time − stage i's handler time: HTTP, framing and
    the loopback transfer both ways. local is the handler time that is neither
    compute nor waiting downstream (frame decode, checks, encode, queueing).
    """
    link = [wall_s - hops[0]["handler_s"]]
    link += [hops[i - 1]["downstream_s"] - hops[i]["handler_s"] for i in range(1, len(hops))]
    local = [h["handler_s"] - h["compute_s"] - h.get("downstream_s", 0.0) for h in hops]
    return {"compute": [h["compute_s"] for h in hops], "local": local, "link": link,
            "queue": [h["queue_s"] for h in hops]}  # fmt: skip


def _median_ms(rows: list[list[float]]) -> list[float]:
    """Element-wise median of equal-length rows, in ms."""
    return [1000 * statistics.median(col) for col in zip(*rows, strict=True)]


def round_record(gen: list[Step], pres: list[Step]) -> dict:
    """The figures of one variant in one round: a generation and its prefills (medians of them)."""
    decode = gen[1:]
    rec = {
        "decode_tok_s": len(decode) / sum(s.wall_s for s in decode),
        "decode_step_ms": 1000 * statistics.median(s.wall_s for s in decode),
        "prefill_ms": 1000 * statistics.median(p.wall_s for p in pres),
        "token_ids": [s.token for s in gen],
        "prefill_tokens": sorted({p.token for p in pres}),
    }
    if decode[-1].hops:
        parts = [step_breakdown(s.wall_s, s.hops) for s in decode]
        for key in ("compute", "local", "link", "queue"):
            rec[f"decode_{key}_ms"] = _median_ms([p[key] for p in parts])
        pre_parts = [step_breakdown(p.wall_s, p.hops) for p in pres]
        rec["prefill_compute_ms"] = _median_ms([p["compute"] for p in pre_parts])
        rec["prefill_link_ms"] = _median_ms([p["link"] for p in pre_parts])
        # Bytes into each stage: the client's frame, then each stage's output frame.
        rec["bytes_decode"] = [decode[-1].bytes_sent] + [h["bytes_out"] for h in decode[-1].hops[:-1]]
        rec["bytes_prefill"] = [pres[-1].bytes_sent] + [h["bytes_out"] for h in pres[-1].hops[:-1]]
    return rec


def first_divergence(tokens: list[int], reference: list[int]) -> int | None:
    """Index of the first differing token (or length mismatch), None when identical."""
    for i, (a, b) in enumerate(zip(tokens, reference, strict=False)):
        if a != b:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


def summarise(name: str, ranges, rounds: list[dict], reference: list[dict]) -> dict:
    """Medians over rounds; ratios are medians of per-round ratios to the unsplit run of the same round."""
    out = {"variant": name, "ranges": ranges, "rounds": len(rounds)}
    for key in ("decode_tok_s", "decode_step_ms", "prefill_ms"):
        out[key] = statistics.median(r[key] for r in rounds)
        out[f"{key}_per_round"] = [r[key] for r in rounds]
    pairs = list(zip(rounds, reference, strict=True))
    for key, ratio_key in (("decode_tok_s", "decode_ratio"), ("prefill_ms", "prefill_ratio")):
        out[f"{ratio_key}_per_round"] = [r[key] / u[key] for r, u in pairs]
        out[ratio_key] = statistics.median(out[f"{ratio_key}_per_round"])
    diverge = [first_divergence(r["token_ids"], u["token_ids"]) for r, u in pairs]
    prefill_same = all(r["prefill_tokens"] == u["prefill_tokens"] for r, u in pairs)
    out["same_tokens"] = prefill_same and all(d is None for d in diverge)
    out["first_divergence"] = next((d for d in diverge if d is not None), None)
    if "decode_link_ms" in rounds[0]:
        for key in HOP_KEYS:
            out[key] = [statistics.median(col) for col in zip(*(r[key] for r in rounds), strict=True)]
        # The decode ratio the chain would reach if the unsplit model computed exactly as fast as the
        # chain's stages did: only the split's own cost (HTTP, framing, hand-offs) counts. Unlike the
        # measured ratio it does not depend on which process the scheduler favoured on a busy machine.
        overhead = [sum(r["decode_local_ms"]) + sum(r["decode_link_ms"]) for r in rounds]
        compute = [sum(r["decode_compute_ms"]) for r in rounds]
        out["decode_overhead_ms"] = statistics.median(overhead)
        out["compute_share"] = statistics.median(c / (c + o) for c, o in zip(compute, overhead, strict=True))
        out["bytes_decode"] = rounds[-1]["bytes_decode"]
        out["bytes_prefill"] = rounds[-1]["bytes_prefill"]
    return out


def rotated(items: list, k: int) -> list:
    """``items`` starting at index k (mod len): spreads any position-in-turn effect over every variant."""
    k %= len(items)
    return items[k:] + items[:k]


def run_round(variants: list, n_tokens: int, n_prefills: int, prompts: tuple[list[int], list[int]], r: int):
    """Every variant's generation advanced one token at a time in turn, then the prefills likewise.

    Interleaving per token (not per generation) keeps the variants' samples
    within a second of each other, so load from other processes on a shared
    machine hits them alike instead of landing on whichever ran at the time.
    """
    prompt_ids, prefill_ids = prompts
    streams = {v.name: v.steps(prompt_ids, n_tokens) for v in variants}
    gens: dict[str, list[Step]] = {v.name: [] for v in variants}
    for t in range(n_tokens):
        for v in rotated(variants, r + t):
            gens[v.name].append(next(streams[v.name]))
    pres: dict[str, list[Step]] = {v.name: [] for v in variants}
    for k in range(n_prefills):
        for v in rotated(variants, r + k):
            pres[v.name].append(next(v.steps(prefill_ids, 1)))
    return {v.name: round_record(gens[v.name], pres[v.name]) for v in variants}


def run_rounds(label: str, variants: list, args, prompts: tuple[list[int], list[int]]) -> list[dict]:
    """Warm every variant, then run the interleaved rounds; returns one summary per variant."""
    log(f"[{label}] warm-up")
    run_round(variants, 4, 1, prompts, 0)
    records: dict[str, list[dict]] = {v.name: [] for v in variants}
    for r in range(args.rounds):
        t0 = time.monotonic()
        for name, rec in run_round(variants, args.new_tokens, args.prefills, prompts, r).items():
            records[name].append(rec)
        ref = records[UNSPLIT][-1]["decode_tok_s"]
        ratios = ", ".join(f"{n} {recs[-1]['decode_tok_s'] / ref:.2f}" for n, recs in records.items())
        log(f"[{label}] round {r + 1}/{args.rounds} ({time.monotonic() - t0:.0f}s): unsplit "
            f"{ref:.2f} tok/s; decode × unsplit: {ratios}")  # fmt: skip
    ref = records[UNSPLIT]
    return [summarise(v.name, v.ranges, records[v.name], ref) for v in variants]


def run_config(label: str, threads: int, refs: list, args, model_dir: Path, num_units: int, prompts) -> dict:
    """One thread configuration: fresh workers with every chain loaded, then the interleaved rounds."""
    torch.set_num_threads(threads)
    log_dir = Path(tempfile.mkdtemp(prefix=f"edgeorch-bench-{label}-"))
    n_workers = max(STAGE_COUNTS)
    log(f"[{label}] {threads} torch thread(s) per process, {n_workers} workers, logs in {log_dir}")
    load_start = os.getloadavg()
    with contextlib.ExitStack() as stack:
        workers = stack.enter_context(LocalWorkers(n_workers, args.store, threads, log_dir, args.worker_env))
        chains = []
        stack.callback(lambda: [c.client.close() for c in chains])
        for n in STAGE_COUNTS:
            ranges = parse_stages(",".join(f"{a}:{b}" for a, b in even_ranges(num_units - 2, n)), num_units)
            # Stage i of every chain lives on worker i: only one chain runs at a time.
            ids = load_chain(workers, args.model, ranges, prefix=f"c{n}", options=args.stage_options)
            chains.append(ChainVariant(ranges, ChainClient(workers.workers[0].url, ids[0])))
            log(f"[{label}] loaded {chains[-1].name} {ranges}")
        if args.thread_chain:
            # The same 3-stage chain on workers that always compute on their compute thread: what
            # running small steps on the event loop (EDGEORCH_INLINE_MAX_TOKENS) is worth, side by side.
            env = {**args.worker_env, "EDGEORCH_INLINE_MAX_TOKENS": "0"}
            off = stack.enter_context(LocalWorkers(3, args.store, threads, log_dir / "thread", env))
            ranges = chains[STAGE_COUNTS.index(3)].ranges
            ids = load_chain(off, args.model, ranges, prefix="t3", options=args.stage_options)
            chains.append(ChainVariant(ranges, ChainClient(off.workers[0].url, ids[0]), THREAD_CHAIN))
            log(f"[{label}] loaded {THREAD_CHAIN} {ranges}")
        summaries = run_rounds(label, [*refs, *chains], args, prompts)
    return {"threads_per_process": threads, "worker_logs": str(log_dir), "variants": summaries,
            "loadavg_start": load_start, "loadavg_end": os.getloadavg()}  # fmt: skip


def machine_info() -> dict:
    """What ran the benchmark."""
    import transformers

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }  # fmt: skip


def log(msg: str) -> None:
    """Progress to stderr."""
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; defaults sized to finish in about six minutes on a 2-core machine."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds per config (default 4)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per decode run (default 64)")
    p.add_argument(
        "--prefill-tokens", type=int, default=64, help="prompt length of the prefill run (default 64)"
    )
    p.add_argument("--prefills", type=int, default=3, help="prefills per variant per round (default 3)")
    p.add_argument("--configs", default="A,B", help="thread configs to run: A (2 per process), B (1)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--engine", choices=ENGINES, default="lean", help="stage engine everywhere (default lean)")
    p.add_argument("--format", choices=FORMATS, default="fp32", help="weight format (default fp32)")
    p.add_argument("--store", type=Path, default=None, help="model store (default: EDGEORCH_MODEL_STORE)")
    p.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the workers, to try a tuning knob (repeatable)")  # fmt: skip
    p.add_argument(
        "--idle-ms",
        type=float,
        default=40.0,
        help="idle time before each step of the idle unsplit reference; 0 skips it (default 40)",
    )
    p.add_argument("--no-thread-chain", dest="thread_chain", action="store_false",
                   help="skip the 3-stage chain whose workers never compute on the event loop")  # fmt: skip
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    args.configs = [c.strip().upper() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in THREAD_CONFIGS]
    if unknown or args.rounds < 1 or args.new_tokens < 2 or args.prefill_tokens < 1 or args.prefills < 1:
        p.error(f"configs must be among {sorted(THREAD_CONFIGS)} (got {unknown}); rounds ≥ 1, new tokens ≥ 2")
    if any("=" not in kv for kv in args.worker_env):
        p.error("--worker-env takes KEY=VALUE")
    args.worker_env = dict(kv.split("=", 1) for kv in args.worker_env)
    args.store = args.store or CommonSettings().model_store
    args.stage_options = {"engine": args.engine, "format": args.format}
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every requested config and write the JSON and Markdown results."""
    args = parse_args(argv)
    model_dir = ModelStore(args.store).path(args.model)
    num_units = adapter_for(load_config(model_dir)).num_units
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    messages = [{"role": "user", "content": PROMPT}]
    prompt_ids = list(
        tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    )
    prefill_ids = tok(PREFILL_TEXT)["input_ids"][: args.prefill_tokens]
    if len(prefill_ids) != args.prefill_tokens:
        raise SystemExit(f"the prefill text gives only {len(prefill_ids)} tokens")
    log(f"loading the unsplit references from {model_dir}")
    engine, hf = EngineVariant(model_dir, num_units, args.engine, args.format), HFVariant(model_dir)
    refs = [engine, hf] + ([IdleEngineVariant(engine, args.idle_ms / 1000)] if args.idle_ms > 0 else [])
    result = {"config": {"model": args.model, "model_dir": str(model_dir), "rounds": args.rounds,
                         "new_tokens": args.new_tokens, "prefill_tokens": args.prefill_tokens,
                         "prefills_per_round": args.prefills,
                         "prompt_tokens": len(prompt_ids), "prompt": PROMPT, "thread_configs": THREAD_CONFIGS,
                         "worker_env": args.worker_env, **args.stage_options},
              "machine": machine_info(), "configs": {}}  # fmt: skip
    for label in args.configs:
        res = run_config(label, THREAD_CONFIGS[label], refs, args, model_dir, num_units,
                         (prompt_ids, prefill_ids))  # fmt: skip
        api = hf.generate_api_tokens(prompt_ids, args.new_tokens)
        res["hf_generate_matches"] = api == [s.token for s in hf.steps(prompt_ids, len(api))]
        result["configs"][label] = res
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out_dir / "overhead.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
