"""KV slices: cache read/append round trips for both engines' caches, and the KV frame's checks."""

from __future__ import annotations

import pytest
import torch

from edgeorch.engine.kv import LeanKVCache
from edgeorch.models.kv import StageKVCache
from edgeorch.transport import kv_frames, wire
from edgeorch.transport.kv_frames import KVFrameError, KVSlice

LAYERS, HEADS, DIM, TOKENS = 3, 2, 4, 5


def _lean_with(kv: torch.Tensor) -> LeanKVCache:
    cache = LeanKVCache(LAYERS, HEADS, DIM, torch.float32, chunk_tokens=4)
    cache.append_layers(range(LAYERS), kv)
    return cache


def test_a_lean_cache_gives_back_what_was_appended_across_chunks() -> None:
    kv = torch.randn(LAYERS, 2, 1, TOKENS, HEADS, DIM)
    cache = _lean_with(kv[:, :, :, :2])
    cache.append_layers(range(LAYERS), kv[:, :, :, 2:])  # grows past the first chunk of 4
    assert cache.seq_len == TOKENS
    assert torch.equal(cache.read_layers(range(LAYERS), 0, TOKENS), kv)
    assert torch.equal(cache.read_layers(range(1, 3), 1, 4), kv[1:3, :, :, 1:4])


def test_a_reference_cache_and_a_lean_cache_hold_the_same_slice() -> None:
    kv = torch.randn(LAYERS, 2, 1, TOKENS, HEADS, DIM)
    ref = StageKVCache()
    ref.append_layers(range(7, 7 + LAYERS), kv)  # global layer indices
    assert ref.seq_len == TOKENS
    assert ref.nbytes() == kv.numel() * 4
    # The reference layout is head major: the keys of layer 8 as attention sees them.
    assert torch.equal(ref._keys[8], kv[1, 0].transpose(1, 2))
    assert torch.equal(ref.read_layers(range(7, 10), 0, TOKENS), _lean_with(kv).read_layers(range(3), 0, 5))


def test_a_lean_cache_refuses_a_slice_that_does_not_fill_every_layer() -> None:
    cache = LeanKVCache(LAYERS, HEADS, DIM, torch.float32)
    with pytest.raises(ValueError, match="does not fill"):
        cache.append_layers(range(2), torch.zeros(2, 2, 1, 3, HEADS, DIM))
    with pytest.raises(ValueError, match="not inside"):
        cache.read_layers(range(LAYERS), 0, 1)  # empty


def test_a_kv_frame_round_trips_and_is_checked_against_the_request() -> None:
    kv = torch.randn(2, 2, 1, TOKENS, HEADS, DIM)
    data = kv_frames.encode_slice(KVSlice(4, 6, 0, TOKENS, kv))
    got = kv_frames.decode_slice(data, (4, 6), (0, TOKENS), 1 << 20)
    assert torch.equal(got.kv, kv)
    with pytest.raises(KVFrameError, match="asked for"):
        kv_frames.decode_slice(data, (4, 7), (0, TOKENS), 1 << 20)
    with pytest.raises(wire.FrameTooLarge):
        kv_frames.decode_slice(data, (4, 6), (0, TOKENS), 100)
    lying = wire.encode_frame(wire.Frame(meta={"kv": {"version": 1, "units": [4, 6], "positions": [0, 5]}},
                                         tensors={"kv": torch.zeros(2, 2, 1, 3, HEADS, DIM)}))  # fmt: skip
    with pytest.raises(KVFrameError, match="does not match"):
        kv_frames.decode_slice(lying, (4, 6), (0, TOKENS), 1 << 20)
    other_version = wire.encode_frame(wire.Frame(meta={"kv": {"version": 2}}, tensors={"kv": kv}))
    with pytest.raises(KVFrameError, match="version"):
        kv_frames.decode_slice(other_version, (4, 6), (0, TOKENS), 1 << 20)
