"""Lazy, accounted access to the tensors of a safetensors checkpoint.

A worker loads only the tensors of the units it serves. Every read goes
through :class:`CheckpointReader`, which records the names and bytes read, so
tests (and later the rollout machinery) can prove what was touched.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointError(RuntimeError):
    """The checkpoint is missing, unreadable, or lacks a tensor a unit needs."""


class CheckpointReader:
    """Reads single tensors from one or more safetensors files on demand."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self._file_of: dict[str, Path] = {}
        index = self.model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: self.model_dir / fname for name, fname in weight_map.items()}
        else:
            single = self.model_dir / "model.safetensors"
            if not single.exists():
                raise CheckpointError(f"no model.safetensors in {self.model_dir}")
            with safe_open(str(single), framework="pt") as f:
                self._file_of = {name: single for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        self._lock = threading.Lock()
        self.names_read: list[str] = []
        self.bytes_read = 0

    def keys(self) -> set[str]:
        """Every tensor name in the checkpoint (read from headers only)."""
        return set(self._file_of)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors, and only those."""
        missing = [n for n in names if n not in self._file_of]
        if missing:
            raise CheckpointError(f"checkpoint {self.model_dir} lacks tensors {missing[:5]}")
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self._file_of[n], []).append(n)
        for path, file_names in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for n in file_names:
                    out[n] = f.get_tensor(n)
        with self._lock:
            self.names_read.extend(names)
            self.bytes_read += sum(t.numel() * t.element_size() for t in out.values())
        return out
