"""Unit sharing on a worker: held units are reused, not re-read, and freed when nobody needs them."""

from __future__ import annotations

import asyncio

import pytest
import torch

from edgeorch.engine.stage import load_stage
from edgeorch.models.checkpoint import CheckpointReader
from edgeorch.runtime.host import StageHost
from edgeorch.runtime.metrics import WorkerMetrics
from edgeorch.runtime.sessions import SessionStore
from edgeorch.runtime.units import UnitCache
from edgeorch.schemas.stage import StageSpec

MODEL = "tiny-llama"  # 6 units


def _unit_bytes(model_dir, units) -> int:
    from edgeorch.models import adapter_for, load_config

    adapter = adapter_for(load_config(model_dir))
    reader = CheckpointReader(model_dir)
    for u in units:
        adapter.load_unit(u, reader, torch.float32)
    return reader.bytes_read


def test_a_second_stage_reads_only_the_units_nobody_holds(store) -> None:
    d = store.path(MODEL)
    cache = UnitCache()
    first = cache.acquire_stage(d, 0, 3)
    assert first.units_shared == 0
    assert first.stage.bytes_read == _unit_bytes(d, [0, 1, 2])
    second = cache.acquire_stage(d, 2, 5)  # unit 2 is held
    assert second.units_shared == 1
    assert second.stage.bytes_read == _unit_bytes(d, [3, 4])
    assert dict(second.stage.units)[2] is dict(first.stage.units)[2]  # the very same module
    assert cache.refs(d, 2) == 2 and cache.held_units() == 5
    same = cache.acquire_stage(d, 0, 5)
    assert same.units_shared == 5 and same.stage.bytes_read == 0 and same.stage.tensors_read == []


def test_releasing_frees_only_what_no_stage_uses(store) -> None:
    d = store.path(MODEL)
    cache = UnitCache()
    a = cache.acquire_stage(d, 0, 3).stage
    b = cache.acquire_stage(d, 2, 6).stage
    full = cache.held_bytes()
    assert cache.release_stage(a) == 2  # units 0 and 1; unit 2 is still b's
    assert cache.refs(d, 2) == 1 and cache.refs(d, 0) == 0
    assert cache.held_bytes() < full
    again = cache.acquire_stage(d, 0, 3)  # 0 and 1 must be read again
    assert again.units_shared == 1 and again.stage.bytes_read == _unit_bytes(d, [0, 1])
    assert cache.release_stage(b) == 3  # 3, 4, 5
    assert cache.release_stage(again.stage) == 3
    assert cache.held_units() == 0 and cache.held_bytes() == 0


def test_shared_units_compute_exactly_what_a_private_load_does(store) -> None:
    d = store.path(MODEL)
    cache = UnitCache()
    cache.acquire_stage(d, 1, 4)
    shared = cache.acquire_stage(d, 0, 6).stage
    private = load_stage(d, 0, 6)
    from edgeorch.models.adapter import StageInput

    ids = torch.tensor([[1, 50, 60, 70]])
    assert torch.equal(shared.run(StageInput(ids, logits="all")), private.run(StageInput(ids, logits="all")))


def test_units_of_another_engine_or_format_are_not_shared(store) -> None:
    from edgeorch.models import adapter_for, load_config

    d = store.path(MODEL)
    cache = UnitCache()
    cache.acquire_stage(d, 0, 3)
    other = adapter_for(load_config(d))
    other.engine, other.weight_format = "lean", "bf16"  # stands in for edgeorch.engine's adapters
    got = cache.acquire_stage(d, 0, 3, adapter=other)
    assert got.units_shared == 0 and got.stage.bytes_read > 0
    assert cache.refs(d, 0) == 1 and cache.refs(d, 0, "lean", "bf16") == 1
    again = cache.acquire_stage(d, 1, 3, adapter=other)
    assert again.units_shared == 2
    assert cache.release_stage(got.stage) == 1  # unit 0 of the lean engine; 1 and 2 are still held


def test_a_failed_load_gives_back_what_it_claimed(store, monkeypatch) -> None:
    d = store.path(MODEL)
    cache = UnitCache()
    cache.acquire_stage(d, 0, 2)
    with pytest.raises(ValueError, match="not inside"):
        cache.acquire_stage(d, 1, 99)
    from edgeorch.models.llama import LlamaAdapter

    def boom(*_a, **_k):
        raise OSError("disk gone")

    monkeypatch.setattr(LlamaAdapter, "load_unit", boom)
    with pytest.raises(OSError, match="disk gone"):
        cache.acquire_stage(d, 1, 4)  # claims unit 1, then fails on unit 2
    assert cache.refs(d, 1) == 1 and cache.held_units() == 2


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2", "minilm-l6"])
def test_host_shares_units_between_stages_and_warms_every_kind_of_stage(store, model) -> None:
    async def scenario() -> None:
        host = StageHost(store, SessionStore(1 << 30, 60), WorkerMetrics(_registry()), "n")
        await host.start()
        try:
            n = (await host.load("x.v1.s0", StageSpec(model=model, start=0, end=3)))[0].num_units
            info, _ = await host.load("x.v1.s1", StageSpec(model=model, start=3, end=n))
            info2, _ = await host.load("x.v2.s0", StageSpec(model=model, start=0, end=n))
            assert info.units_shared == 0 and info2.units_shared == n and info2.bytes_read == 0
            for sid in ("x.v1.s0", "x.v1.s1", "x.v2.s0"):
                assert await host.warm(sid) >= 0.0
            held = host.units.held_units()
            host.unload("x.v1.s0")
            host.unload("x.v1.s1")
            assert host.units.held_units() == held == n  # v2 still holds every unit
            host.unload("x.v2.s0")
            assert host.units.held_units() == 0
        finally:
            await host.close()

    asyncio.run(scenario())


def _registry():
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


def test_standby_units_are_shared_by_a_later_stage_and_cost_no_planned_memory(store) -> None:
    from edgeorch.engine import load_adapter

    model_dir = store.path("smollm2-135m")
    adapter = load_adapter(model_dir, "lean", "int8")  # packed by `make models`: mapped units
    cache = UnitCache()
    first = cache.acquire_stage(model_dir, 0, 10, adapter=adapter)
    planned = cache.held_bytes()
    fresh = cache.add_standby(model_dir, adapter)
    assert len(fresh) == adapter.num_units - 10 and cache.add_standby(model_dir, adapter) == []
    # Standby units are not planned memory, and a memory check must still count them as new.
    assert cache.held_bytes() == planned
    assert cache.holds(model_dir, 5, adapter) and not cache.holds(model_dir, 20, adapter)
    later = cache.acquire_stage(model_dir, 10, adapter.num_units, adapter=adapter)
    assert later.units_shared == adapter.num_units - 10 and later.stage.bytes_read == 0
    assert cache.holds(model_dir, 20, adapter) and cache.held_bytes() > planned
    cache.release_stage(first.stage)
    cache.release_stage(later.stage)
    assert cache.held_units() == adapter.num_units and cache.held_bytes() == 0  # the standby keeps them
    key = (str(model_dir.resolve()), "lean", "int8")
    assert cache.drop_standby({key}) == 0 and cache.drop_standby(set()) == adapter.num_units
    assert cache.held_units() == 0
