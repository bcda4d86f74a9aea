"""Warm standby: every unit of a deployed model kept mapped and touched on each worker serving it.

When a worker is lost, the survivors take over its units. Building them took
seconds (issue 19: most of a killed container's stream gap); even mapping
packed files and touching their pages took 0.3-0.6 s on a half-core worker.
With a standby, every worker that serves a stage of a model also holds the
model's other units (:meth:`UnitCache.add_standby`), so the new plan's loads
share them and read nothing.

Only packed (mapped) units are held this way: their pages are the page cache's,
shared by every worker on the host that maps the same file, and clean, so the
kernel can reclaim them; they are not planned memory. A model without packed
files in the stage's format gets no standby. Opt-in (``EDGEORCH_STANDBY_UNITS``):
the compose stack turns it on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from edgeorch.engine import load_adapter
from edgeorch.engine.pack import packed_source

log = logging.getLogger(__name__)


def _touch(modules) -> None:
    """Read every page of the modules' tensors, so a later forward faults none in."""
    with torch.inference_mode():
        for m in modules:
            for t in m.state_dict().values():
                if t.numel():
                    t.reshape(-1)[:: max(1, 4096 // max(1, t.element_size()))].sum()


async def keep_standby(host, models: set[tuple[str, str]]) -> None:
    """Hold every unit of each (model, format) as a warm standby on ``host``; drop other models' standbys."""

    def work() -> None:
        keep: set[tuple[str, str, str]] = set()
        for model, fmt in sorted(models):
            model_dir = host.store.path(model)
            adapter = load_adapter(model_dir, "lean", fmt)
            if packed_source(model_dir, adapter) is None:
                continue  # built from the checkpoint: anonymous memory, not a standby's to spend
            keep.add((str(Path(model_dir).resolve()), "lean", fmt))
            t0 = time.perf_counter()
            fresh = host.units.add_standby(model_dir, adapter)
            if fresh:
                _touch(fresh)
                log.info("standby: %d more units of %s (%s) mapped and warmed in %.2fs", len(fresh), model, fmt,
                         time.perf_counter() - t0)  # fmt: skip
        freed = host.units.drop_standby(keep)
        if freed:
            log.info("standby: %d units of models no longer served freed", freed)

    await host.on_loader(work)
