"""The peer engines of bench/engine.py (llama.cpp), each in a child process of its own.

A peer is native code built on the machine (``make bench-peers``); where its
build does not suit the CPU it can crash, and in the benchmark's own process a
segfault would take every other row with it. So the parent talks to a child
over pipes, one JSON line per request and per answer, step by step (the
benchmark still interleaves every variant token by token), and a child that
dies becomes a row marked "crashed: ..." instead.

Child side: ``python -m bench.engine_peer --gguf PATH --threads N --n-ctx C``.
It prints ``{"name", "param_bytes", "system_info"}`` once loaded, then answers
each ``{"ids": [...], "reset": bool}`` with ``{"token", "seconds"}`` (the time
of the step inside the child, not the pipe's).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEER_NAME = "llama.cpp Q4_1"


class PeerCrashed(RuntimeError):
    """The peer's child process died; the message says how (signal or exit code) and its last words."""


class SubprocessPeer:
    """A llama.cpp variant whose steps run in a child process."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int):
        self.crashed: str | None = None
        self._stderr = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, "-m", "bench.engine_peer", "--gguf", str(gguf), "--threads", str(threads),
               "--n-ctx", str(n_ctx)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True)  # fmt: skip
        hello = self._read()
        self.name: str = hello["name"]
        self.param_bytes: int = hello["param_bytes"]
        self.system_info: str = hello["system_info"]

    def steps(self, ids: list[int], n: int) -> Iterator[tuple[int, float]]:
        """(greedy token, seconds) per step; the first step is the prompt's prefill."""
        x, reset = list(ids), True
        for _ in range(n):
            answer = self._ask({"ids": x, "reset": reset})
            yield answer["token"], answer["seconds"]
            x, reset = [answer["token"]], False

    def close(self) -> None:
        """End the child (it exits when its stdin closes)."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()

    def _ask(self, request: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the child is gone: _read says how
        return self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if line:
            return json.loads(line)
        rc = self.proc.wait()
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
        self._stderr.seek(0)
        last = " | ".join(self._stderr.read().strip().splitlines()[-3:])
        raise PeerCrashed(f"{how}{f' ({last})' if last else ''}")


def serve(gguf: Path, threads: int, n_ctx: int) -> None:
    """The child: load the GGUF, then answer step requests until stdin closes."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                          n_batch=512, logits_all=False, verbose=False)  # fmt: skip
    info = llama_cpp.llama_print_system_info()
    info = info.decode() if isinstance(info, bytes) else str(info)
    _say({"name": PEER_NAME, "param_bytes": gguf.stat().st_size, "system_info": info.strip()})
    for line in sys.stdin:
        req = json.loads(line)
        if req["reset"]:
            llm.reset()
        t0 = time.perf_counter()
        llm.eval(req["ids"])
        # The last position's logits from the context itself: with logits_all off, llama-cpp-python
        # 0.3.36 leaves llm.scores zero (its argmax was token 0 at every step).
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        token = int(np.argmax(logits))
        _say({"token": token, "seconds": time.perf_counter() - t0})


def _say(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="a bench/engine.py peer in its own process")
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--n-ctx", type=int, default=1024)
    a = p.parse_args()
    serve(a.gguf, a.threads, a.n_ctx)
