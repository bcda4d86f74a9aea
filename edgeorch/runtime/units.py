"""Unit modules shared by every stage of one worker, counted by reference.

Two plan versions of one deployment (or two deployments of one model) often
place the same unit on the same node. Loading it twice would double the
memory and the checkpoint reads of a rollout, so a worker keeps one module per
(model directory, unit, dtype) and hands it to every stage that needs it. A
stage holds one reference per unit; unloading the stage drops them, and a
unit nobody references is freed.

Sharing is safe because a unit module holds weights only: a session's keys
and values live in a KV cache keyed by stage id, so two versions running the
same module never see each other's state.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgeorch.engine.stage import LoadedStage, unit_loader
from edgeorch.models import adapter_for, load_config
from edgeorch.models.adapter import FamilyAdapter

log = logging.getLogger(__name__)

# (resolved model directory, unit index, engine, weight format or dtype): modules built by
# different engines or in different formats are different modules.
UnitKey = tuple[str, int, str, str]


@dataclass
class _Held:
    module: nn.Module
    refs: int
    param_bytes: int


@dataclass
class StageLoad:
    """A stage built from the cache, and how much of it was already held."""

    stage: LoadedStage
    units_shared: int


def _unit_key(model_dir: Path, u: int, adapter: FamilyAdapter, dtype: torch.dtype) -> UnitKey:
    engine = getattr(adapter, "engine", "hf")
    fmt = str(dtype) if engine == "hf" else getattr(adapter, "weight_format", str(dtype))
    return (str(Path(model_dir).resolve()), u, engine, fmt)


class UnitCache:
    """Loaded unit modules keyed by (model directory, unit, dtype), with reference counts; thread-safe."""

    def __init__(self) -> None:
        self._held: dict[UnitKey, _Held] = {}
        self._standby: set[UnitKey] = set()  # units with one reference held as a warm standby
        self._lock = threading.Lock()

    def acquire_stage(
        self,
        model_dir: Path,
        start: int,
        end: int,
        dtype: torch.dtype = torch.float32,
        adapter: FamilyAdapter | None = None,
    ) -> StageLoad:
        """Units ``[start, end)`` as a stage: held units are reused, only missing ones are read.

        ``adapter`` builds the units (default: the model's Hugging Face
        reference adapter); units are shared only between stages whose
        adapters have the same engine and weight format.
        """
        t0 = time.perf_counter()
        adapter = adapter or adapter_for(load_config(model_dir))
        if not 0 <= start < end <= adapter.num_units:
            raise ValueError(
                f"stage [{start}, {end}) is not inside the model's units [0, {adapter.num_units})"
            )
        keys = {u: _unit_key(model_dir, u, adapter, dtype) for u in range(start, end)}
        modules: dict[int, nn.Module] = {}
        with self._lock:  # claim what is held now, so a concurrent unload cannot free it under us
            for u, k in keys.items():
                if k in self._held:
                    self._held[k].refs += 1
                    modules[u] = self._held[k].module
        shared = len(modules)
        missing = [u for u in keys if u not in modules]
        reader = None
        try:
            if missing:
                load, reader = unit_loader(model_dir, adapter, dtype)
                fresh = {u: load(u) for u in missing}
            else:
                fresh = {}
        except BaseException:
            self._drop([keys[u] for u in modules])
            raise
        with self._lock:
            for u, module in fresh.items():
                held = self._held.get(keys[u])
                if held is None:
                    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
                    self._held[keys[u]] = _Held(module, 1, nbytes)
                    modules[u] = module
                else:  # loaded by someone else meanwhile: use theirs, drop ours
                    held.refs += 1
                    modules[u] = held.module
        stage = LoadedStage(
            model_dir=Path(model_dir), adapter=adapter, start=start, end=end,
            units=[(u, modules[u]) for u in range(start, end)],
            bytes_read=reader.bytes_read if reader else 0, load_s=time.perf_counter() - t0,
            tensors_read=list(reader.names_read) if reader else [],
        )  # fmt: skip
        return StageLoad(stage, shared)

    def add_standby(
        self, model_dir: Path, adapter: FamilyAdapter, dtype: torch.dtype = torch.float32
    ) -> list[nn.Module]:
        """Hold every unit of the model as a standby (one reference each); returns the modules read now.

        A standby unit costs no planned memory (:meth:`held_bytes` leaves it
        out, :meth:`holds` says no until a stage takes it): callers keep only
        mapped units so, clean file pages the kernel may reclaim. A stage that
        later needs the unit shares it and reads nothing.
        """
        keys = {u: _unit_key(model_dir, u, adapter, dtype) for u in range(adapter.num_units)}
        with self._lock:
            for k in keys.values():
                if k in self._held and k not in self._standby:
                    self._held[k].refs += 1
                    self._standby.add(k)
            missing = [u for u, k in keys.items() if k not in self._standby]
        if not missing:
            return []
        load, _ = unit_loader(model_dir, adapter, dtype)
        fresh = {u: load(u) for u in missing}
        with self._lock:
            for u, module in fresh.items():
                held = self._held.get(keys[u])
                if held is None:
                    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
                    self._held[keys[u]] = _Held(module, 1, nbytes)
                elif keys[u] not in self._standby:
                    held.refs += 1
                self._standby.add(keys[u])
        return list(fresh.values())

    def drop_standby(self, keep: set[tuple[str, str, str]]) -> int:
        """Drop standby units of models not in ``keep`` (resolved directory, engine, format); returns units freed."""
        with self._lock:
            gone = [k for k in self._standby if (k[0], k[2], k[3]) not in keep]
            self._standby.difference_update(gone)
        return self._drop(gone)

    def _standby_only(self, key: UnitKey) -> bool:
        held = self._held.get(key)
        return held is not None and key in self._standby and held.refs == 1

    def release_stage(self, stage: LoadedStage, dtype: torch.dtype = torch.float32) -> int:
        """Drop a stage's references; returns how many units were freed."""
        return self._drop([_unit_key(stage.model_dir, u, stage.adapter, dtype) for u, _ in stage.units])

    def _drop(self, keys: list[UnitKey]) -> int:
        freed = 0
        with self._lock:
            for k in keys:
                held = self._held.get(k)
                if held is None:
                    continue
                held.refs -= 1
                if held.refs <= 0:
                    del self._held[k]
                    freed += 1
        return freed

    def refs(self, model_dir: Path, u: int, engine: str = "hf", fmt: str = str(torch.float32)) -> int:
        """How many stages hold unit ``u`` of ``model_dir`` (0 when it is not loaded)."""
        with self._lock:
            held = self._held.get((str(Path(model_dir).resolve()), u, engine, fmt))
            return held.refs if held else 0

    def holds(
        self, model_dir: Path, u: int, adapter: FamilyAdapter, dtype: torch.dtype = torch.float32
    ) -> bool:
        """Whether unit ``u`` (as ``adapter`` builds it) is loaded already."""
        with self._lock:
            key = _unit_key(model_dir, u, adapter, dtype)
            return key in self._held and not self._standby_only(key)

    def held_units(self) -> int:
        """Unit modules in memory."""
        with self._lock:
            return len(self._held)

    def held_bytes(self) -> int:
        """Bytes of weights in memory, each shared unit counted once."""
        with self._lock:
            return sum(h.param_bytes for k, h in self._held.items() if not self._standby_only(k))
