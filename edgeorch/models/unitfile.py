"""Per-unit weight files: one safetensors file per unit and format, memory-mapped by the worker.

A prepared model may carry, beside its Hugging Face checkpoint, a directory
``packed/<format>/`` with one file per unit (``unit-00003.safetensors``)
holding that unit's lean-engine tensors exactly as the worker keeps them:
int8 codes and their scales, int4 codes already in the CPU kernel's packed
layout, fused q/k/v and gate/up matrices. ``index.json``, written last,
marks the directory complete; a directory without it is never used.

Reading maps the file read-only (``MAP_SHARED | MAP_POPULATE``) and makes
every tensor a view of the mapping (``torch.frombuffer``): the worker reads
its units' bytes once, holds them as clean file pages, never builds an fp32
copy, and gives them back to the OS the moment the last tensor is dropped.

Each tensor starts at a chosen address modulo 64 bytes: the exact (fp32)
format must multiply by weights at the same alignment as the reference model
(see :func:`edgeorch.engine.formats.place_like`), and a private mapping starts
on a page, so a tensor's file offset modulo 64 is its address modulo 64. The
files stay valid safetensors (the gaps are named ``__pad__.N`` uint8 tensors).
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import warnings
from pathlib import Path

import torch

from edgeorch.models.formats import FORMATS
from edgeorch.models.store import MARKER

PACKED_DIR = "packed"
INDEX = "index.json"
_ALIGN = 64
_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8",
    torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64",
}  # fmt: skip
_TORCH = {v: k for k, v in _DTYPES.items()}


class UnitFileError(RuntimeError):
    """A unit file is missing, truncated or not one this engine wrote."""


def unit_file_name(u: int) -> str:
    """The file name of unit ``u``."""
    return f"unit-{u:05d}.safetensors"


def write_unit_file(
    path: Path, tensors: dict[str, torch.Tensor], address_mods: dict[str, int] | None = None
) -> int:
    """Write ``tensors`` to ``path`` (via a temporary file), each at its address mod 64; returns bytes written."""
    mods = address_mods or {}
    header: dict[str, dict] = {}
    layout: list[tuple[int, torch.Tensor | None, int]] = []  # (offset, tensor or None for a pad, nbytes)
    offset, pads = 0, 0
    # Offsets are relative to the data section, which is itself placed at a multiple of 64 below.
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise UnitFileError(f"tensor {name!r} has dtype {t.dtype}, which unit files do not store")
        want = mods.get(name, 0) % _ALIGN
        gap = (want - offset) % _ALIGN
        if gap:
            header[f"__pad__.{pads}"] = {
                "dtype": "U8",
                "shape": [gap],
                "data_offsets": [offset, offset + gap],
            }
            layout.append((offset, None, gap))
            pads, offset = pads + 1, offset + gap
        n = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        layout.append((offset, t, n))
        offset += n
    header["__metadata__"] = {"format": "edgeorch-unit"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-(8 + len(raw))) % _ALIGN)  # the data section starts on a 64-byte boundary
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t, n in layout:
            if t is None:
                f.write(b"\0" * n)
            else:
                f.write(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return 8 + len(raw) + offset


def map_unit_file(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a unit file, as views of one private, pre-faulted mapping of it."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise UnitFileError(f"{path} is truncated ({size} bytes)")
            (n,) = struct.unpack("<Q", f.read(8))
            if 8 + n > size:
                raise UnitFileError(f"{path} is truncated: header of {n} bytes, file of {size}")
            header = json.loads(f.read(n))
            # Read-only and shared: the pages stay clean page cache (a private writable
            # mapping would be pre-faulted as anonymous copies); populated now, so the
            # load reads the bytes and the first step does not.
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mm = mmap.mmap(f.fileno(), size, flags=flags, prot=mmap.PROT_READ)
    except OSError as exc:
        raise UnitFileError(f"cannot map {path}: {exc}") from exc
    base = 8 + n
    out: dict[str, torch.Tensor] = {}
    for name, meta in header.items():
        if name == "__metadata__" or name.startswith("__pad__."):
            continue
        begin, end = meta["data_offsets"]
        if base + end > size:
            raise UnitFileError(f"{path} is truncated: {name} ends at {base + end}, file of {size}")
        dtype = _TORCH[meta["dtype"]]
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        t = _view(mm, dtype, count, base + begin) if count else torch.empty(0, dtype=dtype)
        out[name] = t.view(meta["shape"])
    return out


def _view(mm: mmap.mmap, dtype: torch.dtype, count: int, offset: int) -> torch.Tensor:
    """A tensor over ``count`` elements of a read-only mapping; weights are never written, so
    torch's warning about a non-writable buffer does not apply."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mm, dtype=dtype, count=count, offset=offset)


class PackedUnits:
    """The packed unit files of one model in one format (``<model_dir>/packed/<format>/``)."""

    def __init__(self, model_dir: Path, fmt: str):
        self.dir = Path(model_dir) / PACKED_DIR / fmt
        self.fmt = fmt

    def complete(self) -> bool:
        """True when every unit was written (the index exists)."""
        return (self.dir / INDEX).exists()

    def index(self) -> dict:
        """The index: format, number of units, bytes per unit file."""
        return json.loads((self.dir / INDEX).read_text())

    def path(self, u: int) -> Path:
        """The file of unit ``u``."""
        return self.dir / unit_file_name(u)

    def file_bytes(self, u: int) -> int:
        """Size of unit ``u``'s file."""
        return self.path(u).stat().st_size

    def begin(self) -> Path:
        """A fresh temporary directory to write the units into (see :meth:`commit`)."""
        tmp = self.dir.with_name(f".{self.fmt}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, record: dict) -> None:
        """Write the index into ``tmp`` and move it into place: a reader sees all units or none."""
        (tmp / INDEX).write_text(json.dumps({"format": self.fmt, **record}, indent=2))
        shutil.rmtree(self.dir, ignore_errors=True)
        tmp.rename(self.dir)


def has_checkpoint(model_dir: Path) -> bool:
    """True when ``model_dir`` holds a safetensors checkpoint (any format can be built from it)."""
    d = Path(model_dir)
    return (d / "model.safetensors").exists() or (d / "model.safetensors.index.json").exists()


def servable_formats(model_dir: Path) -> list[str]:
    """The weight formats a worker can load ``model_dir`` in.

    Every format for a model with a checkpoint (a missing packed format is
    built at load time from it); only its complete packed formats for a
    packed-only model (synthesised: there is nothing to build from). A
    config-only entry (simulated nodes, ``edgeorch/sim``: its record says
    ``"config_only": true``) holds no weights and is planned in any format.
    """
    if has_checkpoint(model_dir) or _config_only(model_dir):
        return list(FORMATS)
    return [f for f in FORMATS if PackedUnits(model_dir, f).complete()]


def _config_only(model_dir: Path) -> bool:
    """Whether the store record marks this entry as a config without weights (for simulated nodes)."""
    try:
        record = json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("config_only") is True
