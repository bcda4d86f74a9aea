"""The memory-bandwidth roofline of bench/engine.py: how close each engine's decode gets to the physical limit.

A decode step of a dense model reads (at least) every weight it multiplies
by once: all layer matrices and the LM head, but only one row of the token
table. So no engine can decode faster than ``bandwidth / bytes read per
token``; a row's *roofline fraction* is its measured tok/s divided by that.

The bandwidth is measured once per thread count in the run itself: the best
of a few passes of ``torch.sum`` over a 1 GiB float32 tensor (32x this CPU's
L3), a plain streaming read in as many threads as the engines get.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

_BYTES = 1 << 30


def read_bandwidth(threads: int, repeats: int = 5, nbytes: int = _BYTES) -> float:
    """Bytes per second a streaming read (``torch.sum`` over float32) reaches at ``threads``: the best of ``repeats``."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(nbytes // 4, dtype=torch.float32)
        best = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            x.sum()
            best = max(best, nbytes / (time.perf_counter() - t0))
        return best
    finally:
        torch.set_num_threads(old)


def engine_read_bytes(stage) -> int:
    """Bytes a lean stage reads per decode token: every unit's weights but the token table (one row of it)."""
    total = 0
    for u, module in stage.units:
        if u == 0:
            continue
        total += sum(p.numel() * p.element_size() for p in module.parameters())
    return total


def hf_read_bytes(model) -> int:
    """Bytes an HF model reads per decode token: its parameters, less the token table unless it is the head too."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    if model.get_output_embeddings().weight.data_ptr() != emb.data_ptr():
        total -= emb.numel() * emb.element_size()
    return total


def gguf_read_bytes(path: Path) -> int:
    """Bytes llama.cpp reads per decode token of a GGUF: every tensor, less the token table when an output head exists."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    total = sum(tensors.values())
    if "output.weight" in tensors:
        total -= tensors.get("token_embd.weight", 0)
    return total


def roofline_tok_s(bandwidth_bytes_per_s: float, read_bytes: int) -> float:
    """The decode rate at which reading the weights alone would take all the time."""
    return bandwidth_bytes_per_s / read_bytes
