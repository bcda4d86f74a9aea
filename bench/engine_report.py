"""The Markdown report of bench/engine.py: speed table per thread count, exactness, quality, targets."""

from __future__ import annotations

TARGET_PEER_1B = 0.9  # at the 1.1B shape, 2 threads: int4 vs Q4_0/Q4_1, int8 vs Q8_0
TARGET_PEER_SMALL = 0.8  # at SmolLM2-135M: int4 vs llama.cpp
TARGET_ROOFLINE = 0.7  # the best edgeorch row at the 1.1B shape
TARGET_TOP1 = 0.97
TARGET_PPL_CHANGE = 0.03
# Which llama.cpp rows each edgeorch format is held against (the same bits per weight, near enough).
PEERS_OF = {"int4": ("llama.cpp Q4_0", "llama.cpp Q4_1"), "int8": ("llama.cpp Q8_0",)}


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f}"


def _speed_table(cfg: dict, quality: dict, peer_status: str) -> list[str]:
    peers = sorted({p for r in cfg["rows"] for p in r.get("decode_vs_peers", {})})
    ref = cfg["reference"]
    bw = cfg["bandwidth_bytes_per_s"]
    lines = [
        f"## {cfg['threads']} thread(s)",
        "",
        f"Read bandwidth (streaming `torch.sum`, {cfg['threads']} thread(s)): {bw / 1e9:.1f} GB/s. "
        f"1-minute load average {cfg['loadavg_start'][0]:.1f} at the start, {cfg['loadavg_end'][0]:.1f} at the end.",
        "",
        f"| variant | weights MB | read MB/token | decode tok/s | roofline tok/s | × roofline | × {ref} "
        + "".join(f"| × {p.removeprefix('llama.cpp ')} " for p in peers)
        + "| prefill 128 ms | top-1 vs fp32 | perplexity (Δ vs fp32) | tokens = ref |",
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(peers) + "---:|---:|---:|:-:|",
    ]
    for r in cfg["rows"]:
        if "status" in r:  # a peer whose child process died: what it said, no figures
            lines.append(f"| {r['variant']} | — | — | {r['status']} |" + " — |" * (8 + len(peers)))
            continue
        q = quality.get(r["variant"].removeprefix("edgeorch "))
        if r["variant"] == "HF transformers bf16":
            q = quality.get("HF bf16")
        top1 = f"{q['top1_agreement']:.3f}" if q else "—"
        ppl = f"{q['perplexity']:.2f} ({100 * q['perplexity_change']:+.1f} %)" if q else "—"
        vs_peers = "".join(f"| {r['decode_vs_peers'][p]:.2f} " if p in r["decode_vs_peers"] else "| — "
                           for p in peers)  # fmt: skip
        same = "yes" if r["same_tokens_as_ref"] else "no"
        lines.append(
            f"| {r['variant']} | {_mb(r['param_bytes'])} | {_mb(r['read_bytes'])} | {r['decode_tok_s']:.2f} "
            f"| {r['roofline_tok_s']:.1f} | {r['roofline_fraction']:.2f} | {r['decode_vs_ref']:.2f} {vs_peers}"
            f"| {r['prefill_ms']:.0f} | {top1} | {ppl} | {same} |"
        )
    if not peers:
        lines.append(f"| llama.cpp | — | — | llama.cpp: {peer_status} |" + " — |" * (8 + len(peers)))
    return [*lines, ""]


def _targets(result: dict) -> list[str]:
    lines = ["## Targets (issue 22)", ""]
    small = result["config"]["model"] == "smollm2-135m"
    want = TARGET_PEER_SMALL if small else TARGET_PEER_1B
    for cfg in result["configs"]:
        rows = {r["variant"]: r for r in cfg["rows"]}
        for fmt, peers in PEERS_OF.items():
            r = rows.get(f"edgeorch {fmt}")
            if r is None or (small and fmt != "int4"):
                continue
            for p, ratio in r.get("decode_vs_peers", {}).items():
                if p in peers or small:
                    ok = "met" if ratio >= want else "NOT met"
                    lines.append(f"- {cfg['threads']} thread(s): {fmt} decode × {p} = {ratio:.2f} "
                                 f"(target ≥ {want}: {ok})")  # fmt: skip
        ours = [r for r in cfg["rows"] if r["variant"].startswith("edgeorch") and "roofline_fraction" in r]
        if ours and not small:
            best = max(ours, key=lambda r: r["roofline_fraction"])
            ok = "met" if best["roofline_fraction"] >= TARGET_ROOFLINE else "NOT met"
            lines.append(f"- {cfg['threads']} thread(s): best edgeorch row of the roofline: {best['variant']} "
                         f"{best['roofline_fraction']:.2f} (target ≥ {TARGET_ROOFLINE}: {ok})")  # fmt: skip
    ex = result.get("exactness")
    if ex:
        lines.append(f"- fp32 token-identical to HF generate on {len(ex['prompts'])} chat prompts: "
                     f"{'yes' if ex['all_identical'] else 'NO'}; max |logit diff| over a prefill "
                     f"{ex['max_abs_logit_diff_prefill']:.3g}")  # fmt: skip
    q = result.get("quality", {})
    for fmt in ("bf16", "int8", "int4"):
        if fmt in q:
            top1, dppl = q[fmt]["top1_agreement"], q[fmt]["perplexity_change"]
            ok = "met" if top1 >= TARGET_TOP1 and abs(dppl) <= TARGET_PPL_CHANGE else "NOT met"
            lines.append(f"- {fmt}: top-1 agreement {top1:.3f} (≥ {TARGET_TOP1}), perplexity "
                         f"{100 * dppl:+.2f} % (within ±{100 * TARGET_PPL_CHANGE:.0f} %): {ok}")  # fmt: skip
    return [*lines, ""]


def markdown(result: dict) -> str:
    """Tables per thread count, the exactness check, the targets, notes."""
    cfg, m = result["config"], result["machine"]
    peer = m.get("llama_cpp_python")
    lines = [f"# Stage engine: {cfg['model']}, unsplit, one process", "",
             f"{m['date']}, {m['nproc']} cores ({m['cpu']}), torch {m['torch']}, transformers "
             f"{m['transformers']}{f', llama-cpp-python {peer}' if peer else ''}; {cfg['rounds']} rounds of "
             f"{cfg['new_tokens']} decoded tokens after a {cfg['prompt_tokens']}-token chat prompt, "
             f"prefill of {cfg['prefill_tokens']} tokens.", "",
             f"CPU flags: {' '.join(m.get('cpu_flags', [])) or 'not read'}."]  # fmt: skip
    if result.get("llama_cpp_system_info"):
        lines.append(f"llama.cpp build: `{result['llama_cpp_system_info']}`.")
    lines.append("")
    for c in result["configs"]:
        lines += _speed_table(c, result.get("quality", {}), result["llama_cpp"])
    lines += _targets(result)
    if "exactness" in result:
        lines += ["## fp32 exactness", "", "| prompt | identical | text |", "|---|:-:|---|"]
        for p, v in result["exactness"]["prompts"].items():
            text = v["text"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {p} | {'yes' if v['identical'] else 'no'} | {text[:80]} |")
    lines += ["", "## Notes", "", *NOTES]
    return "\n".join(lines) + "\n"


NOTES = [
    "- decode tok/s = (N − 1) / summed wall time of the steps after the prompt's prefill; greedy; the "
    "variants' steps interleaved token by token, order rotated; medians over rounds. Every ratio is the "
    "median of per-round ratios.",
    "- HF transformers = AutoModelForCausalLM (SDPA attention, eager PyTorch, no torch.compile) stepped "
    "the way generate() steps it (DynamicCache, logits of the last position only).",
    "- weights MB = bytes of weights held (edgeorch: the unit profile's param_bytes for that format; the "
    "tied LM head counts as its own copy, as on a node that holds only the head; llama.cpp: the GGUF "
    "file).",
    "- top-1 vs fp32 / perplexity: one teacher-forced pass over bench/data/quality_text.txt (700 tokens "
    "of plain prose written for this purpose); agreement = share of positions where the format's argmax "
    "equals the fp32 engine's. The fp32 checkpoint is itself dequantised from the Q4_1 GGUF, so "
    "'fp32' here means that checkpoint's exact arithmetic.",
    "- read MB/token = bytes a decode step must read: every weight but the token table (one row of it is "
    "read); llama.cpp: every tensor of the GGUF but token_embd when it has an output head. roofline tok/s = "
    "the measured streaming read bandwidth ÷ read bytes; × roofline = decode tok/s ÷ roofline tok/s "
    "(bench/engine_roofline.py).",
    "- tokens = ref: the variant's greedy tokens in every timed round equal the reference row's (HF fp32, else edgeorch fp32) in that round.",
]
