"""Tensor frames: how activations cross the network between stages.

A frame is a small JSON header (metadata plus, for each tensor, its name,
dtype and shape) followed by the raw little-endian tensor bytes in header
order. Nothing in a frame is ever executed or unpickled: the decoder only
checks that the header is well formed and that the byte count matches the
shapes exactly, then views the bytes as tensors.

Layout::

    b"EOW1" | u32 little-endian header length | header JSON (UTF-8) | tensor bytes

The format is written against byte streams (:func:`write_frame`,
:func:`read_frame`) so it does not care about the transport; HTTP bodies use
:func:`encode_frame` / :func:`decode_frame`.
"""

from __future__ import annotations

import io
import json
import math
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch

MAGIC = b"EOW1"
CONTENT_TYPE = "application/x-edgeorch-frame"
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSORS = 16
MAX_NDIM = 8
# Bounds shapes with a zero dimension too, which carry no bytes but still
# reach torch.empty: huge dims there overflow its stride arithmetic.
MAX_ELEMENTS = 2**48
DEFAULT_MAX_FRAME_BYTES = 256 * 1024 * 1024

# Wire names are numpy-style strings so a non-Python peer can read frames too.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_PREFIX = struct.Struct("<4sI")

if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise ImportError("edgeorch.transport.wire assumes a little-endian host")


class FrameError(ValueError):
    """A frame is malformed, too large or inconsistent; the message says how."""


class FrameTooLarge(FrameError):
    """A frame (or its header) is larger than the receiver accepts."""


@dataclass
class Frame:
    """Named tensors plus JSON-safe metadata, as sent between stages."""

    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes of tensor payload (header excluded)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype, or FrameError if the wire cannot carry it."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise FrameError(f"dtype {dtype} cannot be sent; supported: {sorted(DTYPES)}") from None


def _tensor_bytes(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    if t.device.type != "cpu" or t.requires_grad or not t.is_contiguous():
        t = t.detach().to("cpu").contiguous()
    # Viewing as uint8 works for every dtype, bfloat16 included (numpy has none).
    # A decode step's frame is encoded once per stage and token: fewer torch
    # calls here are measurable (docs/design.md, "As built: the hop transport").
    return t.view(-1).view(torch.uint8).numpy().tobytes()


def encode_frame(frame: Frame) -> bytes:
    """Serialise a frame to bytes."""
    if len(frame.tensors) > MAX_TENSORS:
        raise FrameError(f"a frame holds at most {MAX_TENSORS} tensors, got {len(frame.tensors)}")
    specs = [
        {"name": n, "dtype": dtype_name(t.dtype), "shape": list(t.shape)} for n, t in frame.tensors.items()
    ]
    try:
        header = json.dumps({"meta": frame.meta, "tensors": specs}, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise FrameError(f"frame metadata is not JSON-safe: {exc}") from exc
    if len(header) > MAX_HEADER_BYTES:
        raise FrameTooLarge(f"frame header is {len(header)} bytes; the limit is {MAX_HEADER_BYTES}")
    _parse_header(header)  # refuse here whatever the receiving decoder would refuse
    parts = [_PREFIX.pack(MAGIC, len(header)), header]
    parts.extend(_tensor_bytes(t) for t in frame.tensors.values())
    return b"".join(parts)


def write_frame(stream: BinaryIO, frame: Frame) -> int:
    """Write a frame to a binary stream; returns the bytes written."""
    data = encode_frame(frame)
    stream.write(data)
    return len(data)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _parse_header(raw: bytes) -> tuple[dict[str, Any], list[tuple[str, torch.dtype, tuple[int, ...], int]]]:
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, NaN, huge ints, deep nesting
        raise FrameError(f"frame header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or set(header) != {"meta", "tensors"}:
        raise FrameError("frame header must be an object with exactly the keys 'meta' and 'tensors'")
    meta, specs = header["meta"], header["tensors"]
    if not isinstance(meta, dict):
        raise FrameError("frame 'meta' must be an object")
    if not isinstance(specs, list) or len(specs) > MAX_TENSORS:
        raise FrameError(f"frame 'tensors' must be a list of at most {MAX_TENSORS} entries")
    parsed, seen = [], set()
    for i, spec in enumerate(specs):
        parsed.append(_parse_spec(i, spec, seen))
    return meta, parsed


def _parse_spec(i: int, spec: Any, seen: set[str]) -> tuple[str, torch.dtype, tuple[int, ...], int]:
    if not isinstance(spec, dict) or set(spec) != {"name", "dtype", "shape"}:
        raise FrameError(f"tensor {i}: needs exactly 'name', 'dtype' and 'shape'")
    name, dtype, shape = spec["name"], spec["dtype"], spec["shape"]
    if not isinstance(name, str) or not 0 < len(name) <= 64 or name in seen:
        raise FrameError(f"tensor {i}: name must be a unique string of 1 to 64 characters")
    seen.add(name)
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise FrameError(f"tensor {name!r}: unknown dtype {dtype!r}; supported: {sorted(DTYPES)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise FrameError(f"tensor {name!r}: shape must be a list of at most {MAX_NDIM} non-negative integers")
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise FrameError(f"tensor {name!r}: shape {shape} is larger than {MAX_ELEMENTS} elements")
    return name, DTYPES[dtype], tuple(shape), math.prod(shape) * DTYPES[dtype].itemsize


def decode_frame(data: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Frame:
    """Parse and validate a frame; raises FrameError on anything inconsistent."""
    view = memoryview(data).cast("B")
    if len(view) > max_bytes:
        raise FrameTooLarge(f"frame is {len(view)} bytes; the limit is {max_bytes}")
    if len(view) < _PREFIX.size:
        raise FrameError(f"frame is {len(view)} bytes, shorter than its {_PREFIX.size}-byte prefix")
    magic, header_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise FrameError(f"not an edgeorch frame (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len > len(view):
        error = FrameTooLarge if header_len > MAX_HEADER_BYTES else FrameError
        raise error(f"frame header length {header_len} is larger than the limit or the frame")
    offset = _PREFIX.size + header_len
    meta, specs = _parse_header(bytes(view[_PREFIX.size : offset]))
    expected = sum(s[3] for s in specs)
    if len(view) - offset != expected:
        raise FrameError(
            f"frame carries {len(view) - offset} payload bytes but its shapes and dtypes need {expected}"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, dtype, shape, nbytes in specs:
        # bytearray copies the slice: the tensor owns writable memory that
        # outlives the request body.
        buf = bytearray(view[offset : offset + nbytes])
        flat = torch.frombuffer(buf, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        if dtype == torch.bool and nbytes and int(flat.max()) > 1:
            raise FrameError(f"tensor {name!r}: bool bytes must be 0 or 1")
        tensors[name] = flat.view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)
        offset += nbytes
    return Frame(meta=meta, tensors=tensors)


def read_frame(stream: BinaryIO, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Frame:
    """Read exactly one frame from a binary stream."""
    prefix = _read_exact(stream, _PREFIX.size)
    magic, header_len = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise FrameError(f"not an edgeorch frame (magic {magic!r}, expected {MAGIC!r})")
    if header_len > MAX_HEADER_BYTES:
        raise FrameTooLarge(f"frame header length {header_len} exceeds {MAX_HEADER_BYTES}")
    header = _read_exact(stream, header_len)
    _, specs = _parse_header(header)
    payload_len = sum(s[3] for s in specs)
    if _PREFIX.size + header_len + payload_len > max_bytes:
        raise FrameTooLarge(f"frame of {_PREFIX.size + header_len + payload_len} bytes exceeds {max_bytes}")
    return decode_frame(prefix + header + _read_exact(stream, payload_len), max_bytes)


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    buf = io.BytesIO()
    while buf.tell() < n:
        chunk = stream.read(n - buf.tell())
        if not chunk:
            raise FrameError(f"stream ended after {buf.tell()} of {n} bytes")
        buf.write(chunk)
    return buf.getvalue()
