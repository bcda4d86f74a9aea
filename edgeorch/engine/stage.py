"""A stage: a contiguous unit range of one model, loaded and ready to run."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from edgeorch.engine import stage_adapter
from edgeorch.models import load_config
from edgeorch.models.adapter import FamilyAdapter, StageInput
from edgeorch.models.checkpoint import CheckpointReader

UnitLoad = Callable[[int], nn.Module]


def unit_loader(model_dir: Path, adapter: FamilyAdapter, dtype: torch.dtype = torch.float32):
    """How to build ``adapter``'s units of ``model_dir``: (load one unit, the reader that counts bytes read).

    A lean adapter whose format has packed unit files maps them (the bytes a
    unit holds, nothing more, no quantising); otherwise units are built from
    the checkpoint's tensors as before.
    """
    from edgeorch.engine.pack import packed_source

    packed = packed_source(model_dir, adapter)
    if packed is not None:
        return (lambda u: adapter.load_packed_unit(u, packed.unit(u))), packed
    reader = CheckpointReader(model_dir)
    return (lambda u: adapter.load_unit(u, reader, dtype)), reader


@dataclass
class LoadedStage:
    """Units ``[start, end)`` of a model, with what it cost to load them."""

    model_dir: Path
    adapter: FamilyAdapter
    start: int
    end: int
    units: list[tuple[int, nn.Module]]
    bytes_read: int
    load_s: float
    tensors_read: list[str] = field(default_factory=list)

    @property
    def first(self) -> bool:
        """True when this stage starts at the embedding (input is token ids)."""
        return self.start == 0

    @property
    def last(self) -> bool:
        """True when this stage ends with the head (output is logits or a pooled vector)."""
        return self.end == self.adapter.num_units

    @property
    def has_layers(self) -> bool:
        """True when the stage holds at least one transformer layer (and so a KV cache)."""
        return any(1 <= u <= self.adapter.num_layers for u, _ in self.units)

    def param_bytes(self) -> int:
        """Bytes of weights this stage holds."""
        return sum(p.numel() * p.element_size() for _, m in self.units for p in m.parameters())

    @property
    def engine(self) -> str:
        """``hf`` (the reference modules) or ``lean`` (edgeorch.engine)."""
        return self.adapter.engine

    @property
    def weight_format(self) -> str:
        """fp32, bf16, int8 or int4 (the hf engine: fp32)."""
        return self.adapter.weight_format

    def new_cache(self):
        """An empty KV cache for one session on this stage (the engines keep different caches)."""
        return self.adapter.new_cache(self.start, self.end)

    @torch.inference_mode()
    def run(self, inp: StageInput, cache=None, row_block: int = 1) -> torch.Tensor:
        """Run every unit of the stage on ``inp``.

        ``row_block`` > 1: a decode step (one token of one session) runs as a batch of one padded to
        that many rows, as it would in any batch, so its bits do not depend on batching.
        """
        if row_block > 1 and self.batches_rows and inp.x.shape[:2] == (1, 1) and inp.attention_mask is None:
            return self.run_rows([inp], [cache], row_block)[0]
        return self.adapter.run(self.units, inp, cache)

    @property
    def batches_rows(self) -> bool:
        """True when the engine runs several sessions' decode tokens as one forward (``run_rows``)."""
        return hasattr(self.adapter, "run_rows")

    @torch.inference_mode()
    def run_rows(self, inputs: list[StageInput], caches: list, row_block: int = 1) -> list[torch.Tensor]:
        """One decode token of each session: one batched forward where the engine can, else one by one.

        Returns each session's output as ``run`` would shape it ([1, 1, ...]). ``row_block`` > 1
        pads the batch to a multiple of it (results independent of the batch; lean engine only).
        """
        if not self.batches_rows:
            return [self.adapter.run(self.units, inp, c) for inp, c in zip(inputs, caches, strict=True)]
        return list(self.adapter.run_rows(self.units, inputs, caches, row_block).split(1))


def load_stage(
    model_dir: Path,
    start: int,
    end: int,
    dtype: torch.dtype = torch.float32,
    engine: str = "hf",
    weight_format: str = "fp32",
) -> LoadedStage:
    """Load units ``[start, end)`` from ``model_dir``, reading only their tensors (or packed unit files).

    ``engine`` ``hf`` (the default here) builds the Hugging Face reference
    modules; ``lean`` builds edgeorch.engine's modules in ``weight_format``
    (``dtype`` then does not apply).
    """
    t0 = time.perf_counter()
    adapter = stage_adapter(load_config(model_dir), engine, weight_format)
    if not 0 <= start < end <= adapter.num_units:
        raise ValueError(f"stage [{start}, {end}) is not inside the model's units [0, {adapter.num_units})")
    load, reader = unit_loader(model_dir, adapter, dtype)
    units = [(u, load(u)) for u in range(start, end)]
    return LoadedStage(
        model_dir=model_dir,
        adapter=adapter,
        start=start,
        end=end,
        units=units,
        bytes_read=reader.bytes_read,
        load_s=time.perf_counter() - t0,
        tensors_read=list(reader.names_read),
    )
