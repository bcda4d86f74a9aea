"""The lean engine's first-use code, paid when a worker starts instead of by its first stage.

The first stage a process loads and runs faults in pages of torch's own
library (``libtorch_cpu.so``: the module, mapping and ``load_state_dict``
paths, the int8/int4/bf16/fp32 matmul kernels, SDPA, RMSNorm, rotary...).
Measured with ``/proc/PID/smaps`` on a worker serving SmolLM2 int4: 7.5 MB of
that library's pages at the load and 5 MB at the first tokens, the same
12.6 MB for a 17 MB stage as for a 42 MB one, and nearly nothing else beyond
the stage's own bytes (0.5 MB of anonymous memory). Those pages are code:
clean, file-backed, shared with every other process that maps the library,
paid once per process whatever the stage holds. Charged to the first stage
they made a small stage look 1.3-1.7x its size.

:func:`warm_engine` pays them up front: it writes a tiny random Llama (one
layer, hidden 64, vocabulary 256) in every lean format into a temporary
directory as packed unit files, loads it the way a worker loads a stage
(mapped unit files, skeleton modules), runs a prefill, decode steps and a
batched decode step through it, samples from its logits, and deletes it. A
worker does this at startup after importing the engine's code
(:func:`edgeorch.engine.import_engine`), on its own loader and compute
threads so that per-thread state (malloc arenas, OpenMP teams) is the one
real stages use. A deployed worker ran the same kernels anyway before its
first stage: it calibrates its deployment's model when it joins. Only the
Llama family is warmed (every generating model the store ships or makes is
one); a GPT-2 or BERT stage still pays its own first-use code.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from edgeorch.models.adapter import StageInput
from edgeorch.models.formats import FORMATS, INT4_Q8_0_TABLES_KEY, INT4_SCALES_KEY

log = logging.getLogger(__name__)

T = TypeVar("T")
Runner = Callable[[Callable[[], T]], T]

# Small enough to build in milliseconds, big enough for every kernel's grouped path (int4 groups of 32).
_WARM_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 256,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
}  # fmt: skip
# Every format, and int4 as a GGUF import holds it: float32 scales (its Q4 blocks: another kernel
# instantiation) and Q8_0 tables (edgeorch.engine.q8_0).
WARM_VARIANTS: tuple[tuple[str, str | None], ...] = (*((f, None) for f in FORMATS), ("int4", "float32"))


def _here(fn: Callable[[], T]) -> T:
    return fn()


def _write_model(root: Path, fmt: str, int4_scales: str | None) -> Path:
    from edgeorch.engine.pack import synth_units

    model_dir = root / f"{fmt}-{int4_scales or 'default'}"
    model_dir.mkdir()
    gguf = {INT4_SCALES_KEY: int4_scales, INT4_Q8_0_TABLES_KEY: ["embed", "lm_head"]} if int4_scales else {}
    config = dict(_WARM_CONFIG, **gguf)
    (model_dir / "config.json").write_text(json.dumps(config))
    synth_units(model_dir, fmt)
    return model_dir


def _exercise(stage, kv_context: int = 16) -> None:
    """Prefill, decode and a batched decode step through ``stage``; greedy and sampled tokens from it."""
    from edgeorch.runtime.sampling import sample_token
    from edgeorch.schemas.stage import Sampling

    caches = [stage.new_cache(), stage.new_cache()]
    ids = torch.arange(1, 9).unsqueeze(0)
    for c in caches:
        c.reserve(1, kv_context)  # as a worker's session reserves its planned context
        logits = stage.run(StageInput(x=ids, position=0), c)
        c.advance(ids.shape[1])
    sample_token(logits, Sampling(), 8)
    sample_token(logits, Sampling(temperature=0.8, top_p=0.9, seed=1), 8)
    stage.run(StageInput(x=torch.tensor([[3]]), position=8), caches[0])
    caches[0].advance(1)
    rows = [StageInput(x=torch.tensor([[4]]), position=c.seq_len) for c in caches]
    stage.run_rows(rows, caches)


def warm_engine(on_loader: Runner = _here, on_compute: Runner = _here) -> float:
    """Load and run a tiny model in every lean format once; returns the seconds it took.

    ``on_loader`` and ``on_compute`` run a callable on the threads that load
    and compute real stages (default: this thread).
    """
    from edgeorch.engine.stage import load_stage

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgeorch-warm-") as tmp:
        for fmt, scales in WARM_VARIANTS:

            def load(fmt: str = fmt, scales: str | None = scales):
                from edgeorch.engine import load_adapter

                # Written on the loader thread too: building modules patches torch globally for a
                # moment (accelerate's init_empty_weights), which must not overlap a real load.
                model_dir = _write_model(Path(tmp), fmt, scales)
                load_adapter(model_dir, "lean", fmt).profile("warm-up")  # what a load's memory check does
                return load_stage(model_dir, 0, 3, engine="lean", weight_format=fmt)

            stage = on_loader(load)
            on_compute(lambda stage=stage: _exercise(stage))
            del stage
    return time.perf_counter() - t0
