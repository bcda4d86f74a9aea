"""The split-overhead benchmark's read-out: ratios from rounds, and the side-by-side lines of its report."""

from __future__ import annotations

from bench.overhead import summarise
from bench.overhead_markdown import THREAD_CHAIN, UNSPLIT, markdown


def _round(tok_s: float, local_ms: list[float] | None = None) -> dict:
    rec = {"decode_tok_s": tok_s, "decode_step_ms": 1000 / tok_s, "prefill_ms": 200.0,
           "token_ids": [1, 2, 3], "prefill_tokens": [7]}  # fmt: skip
    if local_ms is not None:
        n = len(local_ms)
        rec.update(decode_compute_ms=[15.0] * n, decode_local_ms=local_ms, decode_link_ms=[1.0] * n,
                   decode_queue_ms=[0.0] * n, prefill_compute_ms=[60.0] * n, prefill_link_ms=[1.2] * n,
                   bytes_decode=[252] * n, bytes_prefill=[755] * n)  # fmt: skip
    return rec


def test_the_report_sets_inline_steps_beside_the_compute_thread_and_the_idle_reference() -> None:
    unsplit = [_round(20.0), _round(22.0)]
    variants = [
        summarise(UNSPLIT, None, unsplit, unsplit),
        summarise(
            "unsplit engine, 40 ms idle before each decode step", None, [_round(21.0), _round(22.0)], unsplit
        ),
        summarise("3-stage chain", [(0, 11), (11, 21), (21, 32)], [_round(18.5, [0.7] * 3)] * 2, unsplit),
        summarise(THREAD_CHAIN, [(0, 11), (11, 21), (21, 32)], [_round(18.0, [1.1] * 3)] * 2, unsplit),
    ]
    # Ratios are medians of per-round ratios to the same round's unsplit run.
    assert variants[2]["decode_ratio_per_round"] == [18.5 / 20.0, 18.5 / 22.0]
    assert variants[2]["decode_overhead_ms"] == 3 * 0.7 + 3 * 1.0
    result = {
        "config": {"model": "m", "rounds": 2, "new_tokens": 3, "prefill_tokens": 4, "prompt_tokens": 5,
                   "worker_env": {}, "engine": "lean", "format": "fp32"},
        "machine": {"date": "d", "nproc": 2, "cpu": "c", "torch": "t"},
        "configs": {"B": {"threads_per_process": 1, "variants": variants, "loadavg_start": [0.5],
                          "loadavg_end": [0.7], "hf_generate_matches": True}},
    }  # fmt: skip
    md = markdown(result)
    ratio = variants[2]["decode_ratio"]
    assert f"3-stage decode (target ≥ 0.90× unsplit): measured {ratio:.3f}× (NOT met)" in md
    assert (
        f"Small steps on the event loop: 3-stage decode {ratio:.3f}× unsplit, against "
        f"{variants[3]['decode_ratio']:.3f}× with every step on the compute thread; in-worker non-compute "
        "0.70 · 0.70 · 0.70 ms against 1.10 · 1.10 · 1.10 ms per stage." in md
    )
    assert f"decodes at {variants[1]['decode_ratio']:.3f}× the back-to-back unsplit engine" in md
