"""Calibration probes per weight format: the key nodes calibrate under, and what a lean probe measures."""

from __future__ import annotations

import pytest

from edgeorch.engine.kv import LeanKVCache
from edgeorch.runtime.probes import calibrate, load_probe
from edgeorch.schemas.profile import profile_key, split_profile_key


@pytest.mark.parametrize(
    ("model", "fmt", "key"),
    [
        ("smollm2-135m", "fp32", "smollm2-135m"),
        ("smollm2-135m", "int8", "smollm2-135m@int8"),
        ("/models/a@b", "bf16", "/models/a@b@bf16"),
    ],  # fmt: skip
)
def test_profile_keys_round_trip(model: str, fmt: str, key: str) -> None:
    assert profile_key(model, fmt) == key
    assert split_profile_key(key) == (model, fmt)


def test_a_key_without_a_format_is_the_exact_format() -> None:
    assert split_profile_key("tiny-llama") == ("tiny-llama", "fp32")
    assert split_profile_key("@int8") == ("@int8", "fp32")  # no model before the @


def test_a_lean_int8_probe_calibrates_without_changing_its_cache(store) -> None:
    key = profile_key("tiny-llama", "int8")
    probe = load_probe(key, store.path("tiny-llama"), "int8")
    assert isinstance(probe.base_cache, LeanKVCache) and probe.base_cache.seq_len == 64
    assert probe.units[1].qkv.fmt == "int8"  # the lean engine's layer, in the format
    report = calibrate(probe, slowdown=1.0)
    assert report.model == key and report.decode_flops_per_s > 0
    assert {u.unit for u in report.units} == {"embed", "layer0", "head"}
    probe.probe_step()
    assert probe.base_cache.seq_len == 64  # probes write past the cache's length, never advance it
