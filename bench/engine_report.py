"""The Markdown report of bench/engine.py: speed table per thread count, exactness, quality, targets."""

from __future__ import annotations

TARGET_VS_HF = 4.0
TARGET_VS_LLAMA_CPP = 0.6
TARGET_TOP1 = 0.97
TARGET_PPL_CHANGE = 0.03
PEER = "llama.cpp Q4_1"


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f}"


def _speed_table(cfg: dict, quality: dict, peer_status: str) -> list[str]:
    has_peer = any(r["variant"] == PEER for r in cfg["rows"])
    lines = [
        f"## {cfg['threads']} thread(s)",
        "",
        "| variant | weights MB | decode tok/s | × HF fp32 | × llama.cpp | prefill 128 ms | × HF fp32 "
        "| top-1 vs fp32 | perplexity (Δ vs fp32) | tokens = HF fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in cfg["rows"]:
        if "status" in r:  # a peer whose child process died: what it said, no figures
            lines.append(f"| {r['variant']} | — | {r['status']} | — | — | — | — | — | — | — |")
            continue
        q = quality.get(r["variant"].removeprefix("edgeorch "))
        if r["variant"] == "HF transformers bf16":
            q = quality.get("HF bf16")
        top1 = f"{q['top1_agreement']:.3f}" if q else "—"
        ppl = f"{q['perplexity']:.2f} ({100 * q['perplexity_change']:+.1f} %)" if q else "—"
        peer = f"{r['decode_vs_llama_cpp']:.2f}" if "decode_vs_llama_cpp" in r else "—"
        same = "yes" if r["same_tokens_as_hf_fp32"] else "no"
        lines.append(
            f"| {r['variant']} | {_mb(r['param_bytes'])} | {r['decode_tok_s']:.1f} | {r['decode_vs_hf_fp32']:.2f} "
            f"| {peer} | {r['prefill_ms']:.0f} | {r['prefill_vs_hf_fp32']:.2f} | {top1} | {ppl} | {same} |"
        )
    if not has_peer:
        lines.append(f"| llama.cpp Q4_1 | — | llama.cpp: {peer_status} | — | — | — | — | — | — | — |")
    return [*lines, "", f"1-minute load average at the end: {cfg['loadavg_end'][0]:.1f}.", ""]


def _targets(result: dict) -> list[str]:
    lines = ["## Targets", ""]
    q = result["quality"]
    for cfg in result["configs"]:
        rows = {r["variant"]: r for r in cfg["rows"]}
        for fmt in ("int8", "int4"):
            r = rows.get(f"edgeorch {fmt}")
            if r is None:
                continue
            ok = "met" if r["decode_vs_hf_fp32"] >= TARGET_VS_HF else "NOT met"
            lines.append(f"- {cfg['threads']} thread(s), {fmt} decode × HF fp32 = {r['decode_vs_hf_fp32']:.2f} "
                         f"(target ≥ {TARGET_VS_HF}: {ok})")  # fmt: skip
            if "decode_vs_llama_cpp" in r:
                ok = "met" if r["decode_vs_llama_cpp"] >= TARGET_VS_LLAMA_CPP else "NOT met"
                lines.append(f"- {cfg['threads']} thread(s), {fmt} decode × llama.cpp = "
                             f"{r['decode_vs_llama_cpp']:.2f} (target ≥ {TARGET_VS_LLAMA_CPP}: {ok})")  # fmt: skip
    ex = result["exactness"]
    lines.append(f"- fp32 token-identical to HF generate on {len(ex['prompts'])} chat prompts: "
                 f"{'yes' if ex['all_identical'] else 'NO'}; max |logit diff| over a prefill "
                 f"{ex['max_abs_logit_diff_prefill']:.3g}")  # fmt: skip
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
        lines += _speed_table(c, result["quality"], result["llama_cpp"])
    lines += _targets(result)
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
    "- tokens = HF fp32: the variant's greedy tokens in every timed round equal HF fp32's in that round.",
]
