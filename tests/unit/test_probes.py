"""Calibration probes per weight format: the key nodes calibrate under, and what a lean probe measures."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from edgeorch.engine.kv import LeanKVCache
from edgeorch.runtime.agent import AgentConfig, MonitorAgent
from edgeorch.runtime.probes import calibrate, load_probe
from edgeorch.schemas.monitor import NodeCapacity
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
    assert split_profile_key("m@foo") == ("m@foo", "fp32")  # not a format: part of the name


def test_a_lean_int8_probe_calibrates_without_changing_its_cache(store) -> None:
    key = profile_key("tiny-llama", "int8")
    probe = load_probe(key, store.path("tiny-llama"), "int8")
    assert isinstance(probe.base_cache, LeanKVCache) and probe.base_cache.seq_len == 64
    assert probe.units[1].qkv.fmt == "int8"  # the lean engine's layer, in the format
    report = calibrate(probe)
    assert report.model == key and report.decode_flops_per_s > 0
    assert {u.unit for u in report.units} == {"embed", "layer0", "head"}
    probe.probe_step()
    assert probe.base_cache.seq_len == 64  # probes write past the cache's length, never advance it


def test_a_decode_hop_whose_rtt_jumps_wakes_the_uplink_burst() -> None:
    async def run() -> MonitorAgent:
        host = SimpleNamespace(observers=[])
        cfg = AgentConfig(monitor_url="http://127.0.0.1:1", node_id="a", advertise_url="http://127.0.0.1:2",
                          capacity=NodeCapacity(cores=2, memory_bytes=1 << 30))  # fmt: skip
        agent = MonitorAgent(host, cfg)
        agent.peers = {"b": "http://127.0.0.1:3"}
        hop = {"stage": "s", "model": "m", "start": 1, "end": 2, "q_len": 1, "compute_s": 0.01,
               "next_url": "http://127.0.0.1:3/", "bytes_out": 2400}  # fmt: skip
        for _ in range(5):
            host.observers[0]({**hop, "hop_s": 0.0012})  # loopback
        assert not agent._burst_wanted.is_set()
        host.observers[0]({**hop, "hop_s": 0.0090})  # 7x, but under 10 ms: noise
        assert not agent._burst_wanted.is_set()
        host.observers[0]({**hop, "hop_s": 0.1510})  # the uplink got 150 ms slower
        await agent.http.aclose()
        return agent

    agent = asyncio.run(run())
    assert agent._burst_wanted.is_set() and agent._jumped == {"b"}
    assert agent.links["b"].samples == 7  # the jump is also a sample, not a replacement of the median
