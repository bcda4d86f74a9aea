"""The Markdown report of bench/overhead.py: one table per thread config, a time breakdown, notes.

Kept apart from the measuring code so the report can be rebuilt from a
saved ``overhead.json`` (``markdown(json.loads(...))``).
"""

from __future__ import annotations

UNSPLIT = "unsplit engine"
THREAD_CHAIN = "3-stage chain, compute thread"
IDLE_SUFFIX = " ms idle before each decode step"


def idle_name(idle_s: float) -> str:
    """The idle unsplit reference's variant name."""
    return f"{UNSPLIT}, {idle_s * 1000:.0f}{IDLE_SUFFIX}"


def _fmt_list(values, fmt: str) -> str:
    return " · ".join(format(v, fmt) for v in values) if values else "—"


def markdown(result: dict) -> str:
    """One table per thread configuration, a time breakdown, and notes on what was measured."""
    cfg, machine = result["config"], result["machine"]
    env = f" Worker env: {cfg['worker_env']}." if cfg["worker_env"] else ""
    env += f" Engine {cfg['engine']}, weights {cfg['format']}." if "engine" in cfg else ""
    lines = [f"# Split overhead: {cfg['model']} on loopback", "",
             f"{machine['date']}, {machine['nproc']} cores ({machine['cpu']}), torch {machine['torch']}; "
             f"{cfg['rounds']} rounds, {cfg['new_tokens']} new tokens, "
             f"{cfg['prefill_tokens']}-token prefill, "
             f"generation prompt {cfg['prompt_tokens']} tokens.{env}", ""]  # fmt: skip
    for label, res in result["configs"].items():
        lines += _config_section(label, res, machine["nproc"])
    lines += ["## Notes", "", *NOTES]
    return "\n".join(lines) + "\n"


def _ratio(v: dict, key: str) -> str:
    per_round = v[f"{key}_per_round"]
    return f"{v[key]:.3f} ({min(per_round):.2f}–{max(per_round):.2f})"


def _config_section(label: str, res: dict, nproc: int) -> list[str]:
    loads = [res["loadavg_start"][0], res["loadavg_end"][0]]
    load = f"1-minute load average {loads[0]:.1f} → {loads[1]:.1f} on {nproc} cores."
    if max(loads) > nproc:
        load += LOADED_WARNING
    lines = [f"## Config {label}: {res['threads_per_process']} torch thread(s) per process", "", load, "",
             "| variant | decode tok/s | × unsplit (range) | prefill ms | × unsplit (range) "
             "| hop overhead ms (decode) | hop overhead ms (prefill) | bytes/hop decode | bytes/hop prefill "
             "| same tokens |", "|---|---:|---:|---:|---:|---|---|---|---|:-:|"]  # fmt: skip
    for v in res["variants"]:
        same = "yes" if v["same_tokens"] else f"no (from token {v['first_divergence']})"
        lines.append(f"| {v['variant']} | {v['decode_tok_s']:.2f} | {_ratio(v, 'decode_ratio')} "
                     f"| {v['prefill_ms']:.0f} | {_ratio(v, 'prefill_ratio')} "
                     f"| {_fmt_list(v.get('decode_link_ms'), '.2f')} "
                     f"| {_fmt_list(v.get('prefill_link_ms'), '.2f')} "
                     f"| {_fmt_list(v.get('bytes_decode'), 'd')} | {_fmt_list(v.get('bytes_prefill'), 'd')} "
                     f"| {same} |")  # fmt: skip
    lines.append("")
    three = next((v for v in res["variants"] if v["variant"] == "3-stage chain"), None)
    if three is not None:
        met = {True: "met", False: "NOT met"}
        lines.append(f"3-stage decode (target ≥ 0.90× unsplit): measured {three['decode_ratio']:.3f}× "
                     f"({met[three['decode_ratio'] >= 0.90]}); split cost alone (compute share) "
                     f"{three['compute_share']:.3f} ({met[three['compute_share'] >= 0.90]}). ")  # fmt: skip
    thread = next((v for v in res["variants"] if v["variant"] == THREAD_CHAIN), None)
    if three is not None and thread is not None:
        lines += ["", f"Small steps on the event loop: 3-stage decode {three['decode_ratio']:.3f}× unsplit, "
                  f"against {thread['decode_ratio']:.3f}× with every step on the compute thread; "
                  f"in-worker non-compute {_fmt_list(three['decode_local_ms'], '.2f')} ms against "
                  f"{_fmt_list(thread['decode_local_ms'], '.2f')} ms per stage."]  # fmt: skip
    idle = next((v for v in res["variants"] if v["variant"].endswith(IDLE_SUFFIX)), None)
    if idle is not None:
        lines += ["", f"Idle spells alone, no split involved: {idle['variant']} decodes at "
                  f"{idle['decode_ratio']:.3f}× the back-to-back unsplit engine."]  # fmt: skip
    match = "yes" if res.get("hf_generate_matches") else "no"
    lines += [f"HF generate(do_sample=False) gives the timed HF loop's tokens: {match}.", "",
              "Where a decode step's time goes (medians, ms; per stage / per link, entry first):", "",
              "| variant | step | compute | Σ compute | in-worker non-compute | links | overhead total "
              "| compute share |", "|---|---:|---|---:|---|---|---:|---:|"]  # fmt: skip
    for v in res["variants"]:
        if "decode_link_ms" not in v:
            lines.append(f"| {v['variant']} | {v['decode_step_ms']:.1f} | — | — | — | — | — | — |")
            continue
        lines.append(f"| {v['variant']} | {v['decode_step_ms']:.1f} "
                     f"| {_fmt_list(v['decode_compute_ms'], '.1f')} "
                     f"| {sum(v['decode_compute_ms']):.1f} | {_fmt_list(v['decode_local_ms'], '.2f')} "
                     f"| {_fmt_list(v['decode_link_ms'], '.2f')} | {v['decode_overhead_ms']:.2f} "
                     f"| {v['compute_share']:.3f} |")  # fmt: skip
    return [*lines, ""]


LOADED_WARNING = (
    " **Other processes competed for the CPU during this config.** The scheduler then favours processes "
    "that slept (a worker whose stage is a small share of each step) over busy ones (this benchmark "
    "process, which runs the unsplit references and the client), and a process with several torch "
    "threads stalls at every parallel op while one of them waits for a core. The same work then runs at "
    "different speeds in different processes, and the measured ratios say more about the scheduler than "
    "about splitting: read the compute share below (overhead only), or rerun on a quiet machine."
)

NOTES = [
    "- Each round runs every variant's greedy generation of N new tokens (stop ids empty, so all N are "
    "produced) interleaved token by token, variant order rotated every token; then, interleaved the same "
    "way, --prefills prefills per variant of a prompt of exactly --prefill-tokens tokens (their median "
    "counts). Interleaving per token keeps all variants' samples within a second of each other, so load "
    "from other processes hits them alike. Figures are medians over rounds; every ratio is the median of "
    "per-round ratios to the unsplit engine of the same round. A short warm-up round runs first.",
    "- decode tok/s = (N − 1) / summed wall time of the steps after the first (the first step is the "
    "prompt's prefill). For chains the wall time is the client's HTTP round trip per step.",
    "- prefill ms = one step carrying that whole prompt on a fresh session, up to the first token "
    "(head applied to the last position only, in every variant). × unsplit above 1 means slower.",
    "- unsplit engine = edgeorch's stage engine over all units in the benchmark process, no HTTP: "
    "the code the workers run (same --engine and --format). Hugging Face model = AutoModelForCausalLM "
    "fp32 run by hand with a "
    "DynamicCache and logits_to_keep=1 (what generate() does per step), timed per step like the others; its "
    "tokens are checked against generate(do_sample=False) once per config.",
    "- Hop overhead, per decode step (median): entry = step wall − stage 0 handler time (client, HTTP, "
    "uvicorn/FastAPI, loopback both ways); hop i = stage i−1's downstream time − stage i's handler time. "
    "In-worker non-compute = handler − compute − downstream (frame decode, input checks, encode, queueing). "
    "compute + in-worker + links add up to the step's wall time. compute share = Σ compute / (Σ compute + "
    "overhead total), per round then median: the decode ratio the chain would reach against an unsplit "
    "run computing exactly as fast as its stages did, i.e. the cost of the split alone. On an idle "
    "machine it should match × unsplit.",
    "- bytes/hop = frame bytes (header + payload) into each stage: entry carries int64 token ids, later "
    "hops fp32 hidden states (hidden size × 4 bytes per token: 2304 for smollm2-135m). The answer (a "
    "token id) rides back along every hop.",
    "- unsplit engine, N ms idle before each decode step = the unsplit engine's own steps, each after N ms of "
    "sleep (not timed): a stage of a chain sits idle while the others compute (about two thirds of each "
    "step in a 3-stage chain). It shows what idle spells alone do to a step, with no split in it "
    "(--idle-ms 0 skips it).",
    "- 3-stage chain, compute thread = the 3-stage chain on three more workers started with "
    "EDGEORCH_INLINE_MAX_TOKENS=0, so every step computes on the worker's compute thread, as before the "
    "workers ran small steps on their event loop when nothing else was in flight (--no-thread-chain skips it).",
    "- Chains: stage i of every chain is hosted on worker i (4 workers per config, stopped before the next "
    "config starts); the layers are split as evenly as possible, the embedding on the first stage and "
    "norm + head on the last.",
]
