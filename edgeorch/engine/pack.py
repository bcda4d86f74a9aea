"""Writing a model's packed unit files, and loading a stage's units from them.

:func:`pack_model` turns a prepared checkpoint into ``packed/<format>/``
(:mod:`edgeorch.models.unitfile`), one unit at a time: each unit is built
exactly as a load-time lean load builds it (same quantisation, same fused
matrices, fp32 at the reference's alignment) and its tensors are written as
they are, so a unit mapped back from its file is the same module, bit for
bit. :func:`synth_units` writes random-weight units straight in a format,
never holding more than one unit. :func:`read_packed_units` is what a worker
loads with.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from edgeorch.engine import stage_adapter
from edgeorch.models import load_config
from edgeorch.models.checkpoint import CheckpointReader
from edgeorch.models.formats import int4_scale_bytes
from edgeorch.models.unitfile import PackedUnits, map_unit_file, unit_file_name, write_unit_file

log = logging.getLogger(__name__)

# Random synthetic weights: the spread of a trained model's matrices (~0.02, the
# usual initialiser), in whatever form the format stores.
_SYNTH_STD = 0.02


def unit_tensors(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """A lean unit's tensors as they are held, and each one's address modulo 64."""
    tensors = {k: v.detach() for k, v in module.state_dict().items()}
    return tensors, {k: v.data_ptr() % 64 for k, v in tensors.items()}


def pack_model(model_dir: Path, fmt: str) -> dict:
    """Write ``packed/<fmt>/`` for the checkpoint in ``model_dir``; returns the index record."""
    t0 = time.monotonic()
    adapter = stage_adapter(load_config(model_dir), "lean", fmt)
    reader = CheckpointReader(model_dir)
    packed = PackedUnits(model_dir, fmt)
    tmp = packed.begin()
    sizes = []
    for u in range(adapter.num_units):
        tensors, mods = unit_tensors(adapter.load_unit(u, reader))
        sizes.append(write_unit_file(tmp / unit_file_name(u), tensors, mods))
        del tensors  # one unit at a time
    record = {
        "num_units": adapter.num_units,
        "unit_bytes": sizes,
        "torch": torch.__version__,
        "source": "checkpoint",
    }
    packed.commit(tmp, record)
    log.info(
        "packed %s as %s: %d units, %d bytes in %.1fs",
        model_dir,
        fmt,
        len(sizes),
        sum(sizes),
        time.monotonic() - t0,
    )
    return record


def _random_like(name: str, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random tensor of ``p``'s shape and dtype, shaped like a trained weight in that storage."""
    shape, dtype = tuple(p.shape), p.dtype
    if dtype == torch.uint8:  # int4 codes, two per byte: every byte is two valid codes
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    if dtype == torch.int8:
        return torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen)
    if name.endswith("scales") and p.ndim == 3:  # int4 (scale, zero): codes 0..15 around 8 have std ~4.6
        sz = torch.zeros(shape, dtype=torch.bfloat16)
        sz[..., 0] = _SYNTH_STD / 4.6
        return sz
    if name.endswith("scales"):  # int8 per-row (or Q8_0 per-block, fp16) scales: codes in ±127 have std ~73
        return torch.full(shape, _SYNTH_STD / 73.0, dtype=dtype)
    if p.ndim == 1:  # norm weights (ones) and biases (zeros)
        return torch.ones(shape, dtype=dtype) if "bias" not in name else torch.zeros(shape, dtype=dtype)
    return (torch.randn(shape, generator=gen) * _SYNTH_STD).to(dtype)


def synth_units(model_dir: Path, fmt: str, seed: int = 0) -> dict:
    """Write random ``packed/<fmt>/`` units for the config in ``model_dir``, one unit in memory at a time."""
    t0 = time.monotonic()
    config = load_config(model_dir)
    adapter = stage_adapter(config, "lean", fmt)
    # int4 with float32 scales and zeros, as a GGUF's own Q4 blocks are held (engine/gguf_blocks.py).
    f32_scales = fmt == "int4" and int4_scale_bytes(config) == 4
    gen = torch.Generator().manual_seed(seed)
    packed = PackedUnits(model_dir, fmt)
    tmp = packed.begin()
    sizes = []
    for u in range(adapter.num_units):
        skeleton = adapter.skeleton_unit(u)
        tensors = {k: _random_like(k, p, gen) for k, p in skeleton.state_dict(keep_vars=True).items()}
        if f32_scales:
            tensors = {
                k: t.float() if k.endswith("scales") and t.ndim == 3 else t for k, t in tensors.items()
            }
        sizes.append(write_unit_file(tmp / unit_file_name(u), tensors))
        del tensors
    record = {
        "num_units": adapter.num_units,
        "unit_bytes": sizes,
        "torch": torch.__version__,
        "source": f"random (seed {seed})",
    }
    packed.commit(tmp, record)
    log.info("synthesised %s as %s: %d bytes in %.1fs", model_dir, fmt, sum(sizes), time.monotonic() - t0)
    return record


class PackedReader:
    """Maps packed unit files of one model and format, counting the bytes mapped (the bytes read)."""

    def __init__(self, packed: PackedUnits):
        self.packed = packed
        self.bytes_read = 0
        self.names_read: list[str] = []

    def unit(self, u: int) -> dict[str, torch.Tensor]:
        """Unit ``u``'s tensors, mapped from its file."""
        path = self.packed.path(u)
        tensors = map_unit_file(path)
        self.bytes_read += path.stat().st_size
        self.names_read.append(path.name)
        return tensors


def packed_source(model_dir: Path, adapter) -> PackedReader | None:
    """A reader for the adapter's packed units of ``model_dir``, None when it has none (or is not lean)."""
    if getattr(adapter, "engine", "hf") != "lean":
        return None
    packed = PackedUnits(model_dir, adapter.weight_format)
    if not packed.complete():
        return None
    if packed.index().get("torch") != torch.__version__:
        # The int4 codes are stored in this torch's CPU packed layout; another torch may lay them out otherwise.
        log.warning("packed units in %s were written by torch %s; loading from the checkpoint", packed.dir,
                    packed.index().get("torch"))  # fmt: skip
        return None
    return PackedReader(packed)
