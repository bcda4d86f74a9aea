"""The tensor wire format: exact round trips, and refusal of every malformed frame.

Equality is bitwise throughout: floats are compared through an integer view of
the same width, so NaN payloads, signed zeros and subnormals all have to
survive the trip unchanged.
"""

from __future__ import annotations

import ast
import io
import json
import random
import struct
import tokenize
from pathlib import Path
from typing import Any

import pytest
import torch

from edgeorch.transport import wire
from edgeorch.transport.wire import (
    MAGIC,
    MAX_NDIM,
    MAX_TENSORS,
    Frame,
    FrameError,
    decode_frame,
    encode_frame,
)

# The integer type of the same width, for bitwise comparison of float tensors.
_BITS: dict[torch.dtype, torch.dtype] = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
ALL_DTYPES: list[torch.dtype] = list(wire.DTYPES.values())


# --------------------------------------------------------------------------- helpers


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Same dtype, same shape, same bits (NaN payloads included)."""
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    if want.dtype in _BITS:
        bits = _BITS[want.dtype]
        assert torch.equal(got.contiguous().view(bits), want.contiguous().view(bits))
    else:
        assert torch.equal(got, want)


def assert_frames_equal(got: Frame, want: Frame) -> None:
    """Same metadata, same tensor names in the same order, bitwise-equal tensors."""
    assert got.meta == want.meta
    assert list(got.tensors) == list(want.tensors)
    for name, tensor in want.tensors.items():
        assert_bitwise_equal(got.tensors[name], tensor)


def via_bytes(frame: Frame) -> Frame:
    """encode_frame then decode_frame."""
    return decode_frame(encode_frame(frame))


def via_stream(frame: Frame) -> Frame:
    """write_frame into an io.BytesIO, rewind, read_frame; the stream must be fully consumed."""
    stream = io.BytesIO()
    written = wire.write_frame(stream, frame)
    assert written == len(stream.getvalue())
    stream.seek(0)
    out = wire.read_frame(stream)
    assert stream.tell() == written, "read_frame must stop exactly at the end of the frame"
    return out


ROUND_TRIPS = [pytest.param(via_bytes, id="bytes"), pytest.param(via_stream, id="stream")]


def sample_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random values that exercise every bit of the dtype (floats get arbitrary bit patterns)."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen, dtype=torch.uint8).bool()
    if dtype in _BITS:
        bits = _BITS[dtype]
        info = torch.iinfo(bits)
        raw = torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64)
        return raw.to(bits).view(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(dtype)


def raw_frame(header: Any, payload: bytes = b"", *, magic: bytes = MAGIC) -> bytes:
    """A frame built by hand: header may be bytes, or anything json.dumps accepts."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return magic + struct.pack("<I", len(head)) + head + payload


def one_tensor_header(shape: Any, dtype: Any = "float32", name: Any = "x") -> dict[str, Any]:
    """A header with one tensor spec, fields taken as given (so they can be wrong)."""
    return {"meta": {}, "tensors": [{"name": name, "dtype": dtype, "shape": shape}]}


def assert_refused(data: bytes, *needles: str, max_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES) -> None:
    """Both decode_frame and read_frame refuse data with a FrameError whose message holds every needle."""
    with pytest.raises(FrameError) as from_bytes:
        decode_frame(data, max_bytes=max_bytes)
    with pytest.raises(FrameError) as from_stream:
        wire.read_frame(io.BytesIO(data), max_bytes=max_bytes)
    for err in (from_bytes.value, from_stream.value):
        for needle in needles:
            assert needle in str(err), f"{needle!r} not in {str(err)!r}"


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("trip", ROUND_TRIPS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips_bitwise(trip: Any, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    frame = Frame(meta={"dtype": str(dtype)}, tensors={"x": sample_tensor(dtype, (3, 5, 2), gen)})
    assert_frames_equal(trip(frame), frame)


@pytest.mark.parametrize("trip", ROUND_TRIPS)
@pytest.mark.parametrize("dtype", list(_BITS), ids=str)
def test_float_special_values_keep_their_bits(trip: Any, dtype: torch.dtype) -> None:
    bits = _BITS[dtype]
    width = torch.iinfo(bits).bits
    sign = -(1 << (width - 1))  # the sign bit alone, as a signed integer
    exp_all_ones = {16: 0x7C00 if dtype == torch.float16 else 0x7F80, 32: 0x7F800000}[width]
    patterns = [
        0,  # +0
        sign,  # -0
        1,  # smallest subnormal
        exp_all_ones,  # +inf
        sign | exp_all_ones,  # -inf
        exp_all_ones | 1,  # signalling NaN with payload 1
        exp_all_ones | 0x3,  # NaN, another payload
        sign | exp_all_ones | 0x5,  # negative NaN with a payload
    ]
    x = torch.tensor(patterns, dtype=torch.int64).to(bits).view(dtype)
    out = trip(Frame(tensors={"x": x})).tensors["x"]
    assert out.view(bits).tolist() == x.view(bits).tolist()


@pytest.mark.parametrize("trip", ROUND_TRIPS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_zero_dim_tensor(trip: Any, dtype: torch.dtype) -> None:
    x = sample_tensor(dtype, (), torch.Generator().manual_seed(2))
    out = trip(Frame(tensors={"scalar": x})).tensors["scalar"]
    assert out.dim() == 0
    assert_bitwise_equal(out, x)


@pytest.mark.parametrize("trip", ROUND_TRIPS)
@pytest.mark.parametrize("shape", [(0,), (2, 0, 3), (0, 0), (1, 0)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool], ids=str)
def test_empty_tensor(trip: Any, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = torch.empty(shape, dtype=dtype)
    frame = Frame(meta={"empty": True}, tensors={"e": x})
    data = encode_frame(frame)
    header_len = struct.unpack_from("<I", data, 4)[0]
    assert len(data) == 8 + header_len, "an empty tensor adds no payload bytes"
    out = trip(frame).tensors["e"]
    assert out.shape == x.shape
    assert out.dtype == dtype


@pytest.mark.parametrize("trip", ROUND_TRIPS)
def test_several_tensors_keep_names_order_and_values(trip: Any) -> None:
    gen = torch.Generator().manual_seed(3)
    tensors = {
        "hidden": sample_tensor(torch.bfloat16, (1, 7, 16), gen),
        "positions": torch.arange(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4, dtype=torch.float16),
        "scale": torch.tensor(0.5),
        "ids": sample_tensor(torch.int32, (7,), gen),
    }
    frame = Frame(meta={"step": 4}, tensors=tensors)
    assert_frames_equal(trip(frame), frame)
    assert frame.nbytes() == sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("trip", ROUND_TRIPS)
def test_max_tensors_and_max_ndim_are_accepted(trip: Any) -> None:
    tensors = {f"t{i}": torch.full((1,) * MAX_NDIM, i, dtype=torch.int8) for i in range(MAX_TENSORS)}
    frame = Frame(tensors=tensors)
    assert_frames_equal(trip(frame), frame)


@pytest.mark.parametrize("trip", ROUND_TRIPS)
def test_non_contiguous_input(trip: Any) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    transposed = base.t()
    strided = base[:, ::2]
    assert not transposed.is_contiguous() and not strided.is_contiguous()
    out = trip(Frame(tensors={"t": transposed, "s": strided}))
    assert_bitwise_equal(out.tensors["t"], transposed)
    assert_bitwise_equal(out.tensors["s"], strided)
    assert out.tensors["t"].tolist() == transposed.tolist()


@pytest.mark.parametrize("trip", ROUND_TRIPS)
def test_tensor_that_requires_grad(trip: Any) -> None:
    x = torch.linspace(-1, 1, 5, requires_grad=True)
    out = trip(Frame(tensors={"x": x})).tensors["x"]
    assert_bitwise_equal(out, x.detach())
    assert not out.requires_grad


@pytest.mark.parametrize("trip", ROUND_TRIPS)
def test_metadata_preserved_exactly(trip: Any) -> None:
    meta = {
        "deployment": "chat",
        "plan_version": 7,
        "session": "5f0c8e0e-0d5b-4a1e-9f0a-3c2b1a0f9e8d",
        "step": 0,
        "sampling": {"temperature": 0.1 + 0.2, "top_p": 1e-300, "seed": -(2**63), "stop": ["\n", "</s>"]},
        "flags": [True, False, None],
        "unicode": "Grüße — 東京 — \U0001f600",
        "big": 2**64 + 1,
        "nested": {"a": {"b": {"c": []}}},
        "": "empty key",
    }
    out = trip(Frame(meta=meta, tensors={}))
    assert out.meta == meta
    assert json.dumps(out.meta, sort_keys=True) == json.dumps(meta, sort_keys=True)
    assert out.meta["sampling"]["temperature"] == 0.1 + 0.2  # not rounded through a shorter repr
    assert out.tensors == {}


def test_decoded_tensors_own_writable_memory() -> None:
    data = bytearray(encode_frame(Frame(tensors={"x": torch.arange(4, dtype=torch.int32)})))
    out = decode_frame(data)
    data[-4:] = b"\xff\xff\xff\xff"  # the caller reuses its buffer
    assert out.tensors["x"].tolist() == [0, 1, 2, 3]
    out.tensors["x"][0] = 9  # must not raise: the tensor is writable
    assert out.tensors["x"].tolist() == [9, 1, 2, 3]


def test_decode_accepts_bytearray_and_memoryview() -> None:
    frame = Frame(meta={"k": 1}, tensors={"x": torch.arange(6, dtype=torch.int64).reshape(2, 3)})
    data = encode_frame(frame)
    assert_frames_equal(decode_frame(bytearray(data)), frame)
    assert_frames_equal(decode_frame(memoryview(data)), frame)


def test_consecutive_frames_on_one_stream() -> None:
    frames = [Frame(meta={"i": i}, tensors={"x": torch.full((i,), i, dtype=torch.int32)}) for i in range(4)]
    stream = io.BytesIO()
    for frame in frames:
        wire.write_frame(stream, frame)
    stream.seek(0)
    for frame in frames:
        assert_frames_equal(wire.read_frame(stream), frame)
    assert stream.read() == b""


class _Trickle(io.RawIOBase):
    """A stream that hands out at most one byte per read(), like a slow socket."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self._data.read(min(n, 1) if n >= 0 else 1)


def test_read_frame_assembles_short_reads() -> None:
    frame = Frame(meta={"trickle": True}, tensors={"x": torch.arange(10, dtype=torch.float16)})
    assert_frames_equal(wire.read_frame(_Trickle(encode_frame(frame))), frame)


@pytest.mark.parametrize("seed", range(40))
def test_random_frames_round_trip(seed: int) -> None:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(rng.randint(0, MAX_TENSORS)):
        ndim = rng.randint(0, 4)
        shape = tuple(rng.choice([0, 1, 1, 2, 3, 5, 8]) for _ in range(ndim))
        x = sample_tensor(rng.choice(ALL_DTYPES), shape, gen)
        if x.dim() >= 2 and rng.random() < 0.5:
            x = x.transpose(0, -1)
        tensors[f"t{i}_{rng.randrange(10**6)}"] = x
    frame = Frame(meta={"seed": seed, "r": rng.random()}, tensors=tensors)
    assert_frames_equal(via_bytes(frame), frame)
    assert_frames_equal(via_stream(frame), frame)


# --------------------------------------------------------------------------- refusals on decode


def test_wrong_magic() -> None:
    good = encode_frame(Frame(tensors={"x": torch.zeros(2)}))
    assert_refused(b"EOW2" + good[4:], "not an edgeorch frame", "EOW2")


@pytest.mark.parametrize("size", range(8))
def test_truncated_prefix(size: int) -> None:
    data = encode_frame(Frame())[:size]
    with pytest.raises(FrameError, match=f"frame is {size} bytes, shorter than its 8-byte prefix"):
        decode_frame(data)
    with pytest.raises(FrameError, match=f"stream ended after {size} of 8 bytes"):
        wire.read_frame(io.BytesIO(data))


def test_header_length_beyond_frame() -> None:
    good = encode_frame(Frame(meta={"a": 1}))
    header_len = struct.unpack_from("<I", good, 4)[0]
    lying = good[:4] + struct.pack("<I", header_len + 1) + good[8:]
    with pytest.raises(
        FrameError, match=f"header length {header_len + 1} is larger than the limit or the frame"
    ):
        decode_frame(lying)
    with pytest.raises(FrameError, match="stream ended"):
        wire.read_frame(io.BytesIO(lying))


def test_header_length_beyond_limit() -> None:
    huge = MAGIC + struct.pack("<I", wire.MAX_HEADER_BYTES + 1)
    assert_refused(huge + b"{" * (wire.MAX_HEADER_BYTES + 1), f"header length {wire.MAX_HEADER_BYTES + 1}")


@pytest.mark.parametrize(
    "header",
    [b"", b"{", b"not json", b'{"meta": {}, "tensors": []', b"\xff\xfe{}", b"{'meta': {}, 'tensors': []}"],
    ids=["empty", "open-brace", "text", "unterminated", "not-utf8", "single-quotes"],
)
def test_header_not_json(header: bytes) -> None:
    assert_refused(raw_frame(header), "frame header is not valid JSON")


@pytest.mark.parametrize(
    "header",
    [
        [],
        "meta",
        42,
        None,
        {"meta": {}},
        {"tensors": []},
        {"meta": {}, "tensors": [], "extra": 1},
        {"Meta": {}, "tensors": []},
    ],
    ids=["list", "string", "number", "null", "no-tensors", "no-meta", "extra-key", "wrong-case"],
)
def test_header_not_an_object_with_exactly_meta_and_tensors(header: Any) -> None:
    assert_refused(raw_frame(header), "exactly the keys 'meta' and 'tensors'")


@pytest.mark.parametrize("meta", [[], "x", 1, None])
def test_meta_not_an_object(meta: Any) -> None:
    assert_refused(raw_frame({"meta": meta, "tensors": []}), "'meta' must be an object")


@pytest.mark.parametrize("tensors", [{}, "x", None, 3])
def test_tensors_not_a_list(tensors: Any) -> None:
    assert_refused(raw_frame({"meta": {}, "tensors": tensors}), "'tensors' must be a list")


@pytest.mark.parametrize(
    "spec",
    [
        "x",
        ["x", "float32", [1]],
        {"name": "x", "dtype": "float32"},
        {"name": "x", "dtype": "float32", "shape": [1], "offset": 0},
    ],
    ids=["string", "list", "missing-shape", "extra-key"],
)
def test_tensor_spec_with_wrong_keys(spec: Any) -> None:
    assert_refused(
        raw_frame({"meta": {}, "tensors": [spec]}), "tensor 0: needs exactly 'name', 'dtype' and 'shape'"
    )


@pytest.mark.parametrize(
    "name", ["", "x" * 65, 5, None, ["x"]], ids=["empty", "too-long", "int", "null", "list"]
)
def test_bad_tensor_name(name: Any) -> None:
    assert_refused(raw_frame(one_tensor_header([1], name=name), b"\0" * 4), "name must be a unique string")


def test_tensor_name_of_64_characters_is_accepted() -> None:
    out = decode_frame(raw_frame(one_tensor_header([1], name="n" * 64), b"\0" * 4))
    assert list(out.tensors) == ["n" * 64]


@pytest.mark.parametrize("dtype", ["float64", "complex64", "Float32", "torch.float32", "", 7, None])
def test_unknown_dtype(dtype: Any) -> None:
    assert_refused(raw_frame(one_tensor_header([1], dtype=dtype), b"\0" * 8), "unknown dtype", repr(dtype))


@pytest.mark.parametrize(
    "shape",
    [[-1], [2, -3], [1.0], [2.5], [True], [False, 1], ["2"], [None], [[2]], "2", 2, None, {"0": 2}],
    ids=str,
)
def test_bad_dims(shape: Any) -> None:
    assert_refused(
        raw_frame(one_tensor_header(shape), b"\0" * 8), "shape must be a list of at most 8 non-negative"
    )


def test_too_many_dims() -> None:
    assert_refused(raw_frame(one_tensor_header([1] * (MAX_NDIM + 1)), b"\0" * 4), f"at most {MAX_NDIM}")


def test_too_many_tensors() -> None:
    specs = [{"name": f"t{i}", "dtype": "uint8", "shape": [1]} for i in range(MAX_TENSORS + 1)]
    header = {"meta": {}, "tensors": specs}
    assert_refused(raw_frame(header, b"\0" * (MAX_TENSORS + 1)), f"at most {MAX_TENSORS} entries")


def test_duplicate_tensor_names() -> None:
    spec = {"name": "x", "dtype": "uint8", "shape": [1]}
    assert_refused(raw_frame({"meta": {}, "tensors": [spec, spec]}, b"\0\0"), "tensor 1", "unique")


@pytest.mark.parametrize("delta", [-1, +1], ids=["one-short", "one-long"])
@pytest.mark.parametrize(
    ("dtype", "shape"), [("float32", [2, 3]), ("bfloat16", [5]), ("bool", [3, 1]), ("int64", [])], ids=str
)
def test_payload_one_byte_off(delta: int, dtype: str, shape: list[int]) -> None:
    itemsize = torch.empty((), dtype=wire.DTYPES[dtype]).element_size()
    need = itemsize
    for d in shape:
        need *= d
    data = raw_frame(one_tensor_header(shape, dtype=dtype), b"\x01" * (need + delta))
    with pytest.raises(
        FrameError, match=f"carries {need + delta} payload bytes but its shapes and dtypes need {need}"
    ):
        decode_frame(data)
    if delta < 0:
        with pytest.raises(FrameError, match="stream ended"):
            wire.read_frame(io.BytesIO(data))
    else:  # a stream reader stops at the frame's end; the extra byte belongs to whatever follows
        stream = io.BytesIO(data)
        assert wire.read_frame(stream).tensors["x"].shape == tuple(shape)
        assert stream.read() == b"\x01"


def test_empty_tensor_with_stray_payload() -> None:
    with pytest.raises(FrameError, match="carries 1 payload bytes but its shapes and dtypes need 0"):
        decode_frame(raw_frame(one_tensor_header([2, 0, 3]), b"\0"))


def test_frame_over_max_bytes() -> None:
    data = encode_frame(Frame(tensors={"x": torch.zeros(100, dtype=torch.uint8)}))
    assert decode_frame(data, max_bytes=len(data)).tensors["x"].numel() == 100
    assert wire.read_frame(io.BytesIO(data), max_bytes=len(data)).tensors["x"].numel() == 100
    assert_refused(data, f"{len(data)} bytes", f"{len(data) - 1}", max_bytes=len(data) - 1)


def test_read_frame_refuses_oversized_frame_before_reading_its_payload() -> None:
    # The header claims 1 GiB of payload that never arrives: the reader must refuse on the
    # header alone instead of waiting for (or allocating) the payload.
    head = raw_frame(one_tensor_header([1024, 1024, 256]))
    with pytest.raises(FrameError, match="exceeds 1000000"):
        wire.read_frame(io.BytesIO(head), max_bytes=1_000_000)


@pytest.mark.parametrize("seed", range(300))
def test_random_garbage_only_ever_raises_frame_error(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.choice([0, 1, 7, 8, 9, 32, 200, 4096])
    data = bytes(rng.getrandbits(8) for _ in range(size))
    if seed % 3 == 1:  # a right magic, so the header-length and JSON checks are reached too
        data = MAGIC + data[4:]
    if seed % 3 == 2:  # and a plausible header length
        data = MAGIC + struct.pack("<I", max(0, size - 8 - rng.randint(0, 8))) + data[8:]
    with pytest.raises(FrameError):
        decode_frame(data)
    with pytest.raises(FrameError):
        wire.read_frame(io.BytesIO(data))


@pytest.mark.parametrize("seed", range(100))
def test_mutated_valid_frames_never_raise_anything_but_frame_error(seed: int) -> None:
    """Flip bytes inside a real frame: decoding either succeeds or raises FrameError, nothing else."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    good = encode_frame(
        Frame(
            meta={"s": seed}, tensors={"a": sample_tensor(torch.float16, (2, 3), gen), "b": torch.ones(2, 2)}
        )
    )
    data = bytearray(good)
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] = rng.getrandbits(8)
    for decode in (lambda: decode_frame(bytes(data)), lambda: wire.read_frame(io.BytesIO(bytes(data)))):
        try:
            decode()
        except FrameError:
            pass


def test_read_frame_stream_ends_early() -> None:
    data = encode_frame(Frame(meta={"m": "x" * 20}, tensors={"x": torch.arange(8, dtype=torch.int64)}))
    header_end = 8 + struct.unpack_from("<I", data, 4)[0]
    for cut in [0, 3, 8, 12, header_end - 1, header_end, header_end + 5, len(data) - 1]:
        with pytest.raises(FrameError, match=r"stream ended after \d+ of \d+ bytes"):
            wire.read_frame(io.BytesIO(data[:cut]))


# --------------------------------------------------------------------------- refusals on encode


@pytest.mark.parametrize(
    "meta",
    [{"t": float("nan")}, {"t": float("inf")}, {"nested": [-float("inf")]}, {"obj": object()}, {"b": b"x"}],
    ids=["nan", "inf", "nested-inf", "object", "bytes"],
)
def test_encode_refuses_meta_that_is_not_json(meta: dict[str, Any]) -> None:
    with pytest.raises(FrameError, match="metadata is not JSON-safe"):
        encode_frame(Frame(meta=meta))
    with pytest.raises(FrameError, match="metadata is not JSON-safe"):
        wire.write_frame(io.BytesIO(), Frame(meta=meta))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float64, torch.int16], ids=str)
def test_encode_refuses_unsupported_torch_dtype(dtype: torch.dtype) -> None:
    with pytest.raises(FrameError, match=f"dtype {dtype} cannot be sent"):
        encode_frame(Frame(tensors={"x": torch.zeros(2, dtype=dtype)}))


def test_encode_refuses_too_many_tensors() -> None:
    tensors = {f"t{i}": torch.zeros(1) for i in range(MAX_TENSORS + 1)}
    with pytest.raises(FrameError, match=f"at most {MAX_TENSORS} tensors, got {MAX_TENSORS + 1}"):
        encode_frame(Frame(tensors=tensors))


def test_encode_refuses_oversized_header() -> None:
    with pytest.raises(FrameError, match=f"the limit is {wire.MAX_HEADER_BYTES}"):
        encode_frame(Frame(meta={"blob": "x" * wire.MAX_HEADER_BYTES}))


def test_stream_writer_writes_nothing_when_encode_fails() -> None:
    stream = io.BytesIO()
    with pytest.raises(FrameError):
        wire.write_frame(stream, Frame(tensors={"x": torch.zeros(1, dtype=torch.complex64)}))
    assert stream.getvalue() == b""


# --------------------------------------------------------------------------- no code execution


def _code_tokens(source: str) -> list[str]:
    """The source's tokens without comments and string literals (the docstring says "unpickled")."""
    skip = {tokenize.COMMENT, tokenize.STRING}
    return [
        tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type not in skip
    ]


def test_module_never_unpickles() -> None:
    source = Path(wire.__file__).read_text(encoding="utf-8")
    code = " ".join(_code_tokens(source))
    assert "pickle" not in code.lower()
    assert "torch.load" not in source and "torch . load" not in code
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in {"eval", "exec", "__import__"}, node.func.id
    assert not imported & {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}, (
        imported
    )
    # The checks above would pass on an empty file; make sure they looked at the real module.
    assert "json" in imported and "decode_frame" in code


# --------------------------------------------------------------------------- hostile and odd frames
# Each of these once escaped as something other than FrameError (or was accepted); keep them.


def test_deeply_nested_header_is_a_frame_error() -> None:
    depth = 30_000  # fits under MAX_HEADER_BYTES, far beyond the json module's recursion limit
    header = b'{"meta": {"x": ' + b"[" * depth + b"]" * depth + b'}, "tensors": []}'
    assert len(header) <= wire.MAX_HEADER_BYTES
    assert_refused(raw_frame(header), "not valid JSON")


def test_huge_integer_literal_in_header_is_a_frame_error() -> None:
    # int() refuses more than 4300 digits (CPython's int_max_str_digits); json.loads lets that
    # ValueError escape, and a caller that catches FrameError (a ValueError subclass) misses it.
    header = b'{"meta": {"x": ' + b"7" * 5000 + b'}, "tensors": []}'
    assert_refused(raw_frame(header))


@pytest.mark.parametrize("dtype", [[], {}, ["float32"]], ids=str)
def test_unhashable_dtype_is_a_frame_error(dtype: Any) -> None:
    assert_refused(raw_frame(one_tensor_header([1], dtype=dtype), b"\0" * 4), "unknown dtype")


@pytest.mark.parametrize("shape", [[0, 2**63], [0, 2**62, 4], [2**40, 2**40, 0]], ids=str)
def test_zero_element_shape_with_huge_dims_is_a_frame_error(shape: list[int]) -> None:
    assert_refused(raw_frame(one_tensor_header(shape)), "shape")


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_decoder_refuses_non_standard_json_constants(literal: bytes) -> None:
    assert_refused(raw_frame(b'{"meta": {"x": ' + literal + b'}, "tensors": []}'), "JSON")


@pytest.mark.parametrize(
    "frame",
    [
        Frame(tensors={"": torch.zeros(1)}),
        Frame(tensors={"x" * 65: torch.zeros(1)}),
        Frame(tensors={7: torch.zeros(1)}),  # type: ignore[dict-item]
        Frame(tensors={"x": torch.zeros((1,) * (MAX_NDIM + 1))}),
        Frame(meta=["not", "an", "object"]),  # type: ignore[arg-type]
    ],
    ids=["empty-name", "long-name", "int-name", "too-many-dims", "list-meta"],
)
def test_encoder_refuses_what_the_decoder_refuses(frame: Frame) -> None:
    with pytest.raises(FrameError):
        encode_frame(frame)


def test_bool_payload_must_be_zero_or_one() -> None:
    data = raw_frame(one_tensor_header([2], dtype="bool"), b"\x02\x01")
    try:
        out = decode_frame(data).tensors["x"]
    except FrameError:
        return  # refusing the frame is a fix too
    assert out.view(torch.uint8).tolist() == [1, 1], "a decoded bool tensor must hold canonical 0/1 bytes"


def test_decode_accepts_memoryview_of_any_format() -> None:
    frame = Frame(meta={"pad": ""}, tensors={"x": torch.arange(3, dtype=torch.int32)})
    while len(encode_frame(frame)) % 4:  # grow the frame to a whole number of 4-byte items
        frame.meta["pad"] += "p"
    view = memoryview(bytearray(encode_frame(frame))).cast("I")
    assert_frames_equal(decode_frame(view), frame)
