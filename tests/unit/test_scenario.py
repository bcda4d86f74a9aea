"""Scenario files: parsing, validation messages, sizes, the worker-count override, the demo file."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeorch.local.scenario import (
    DEFAULT_SCENARIO,
    ScenarioError,
    WorkerSpec,
    load_scenario,
    parse_bytes,
    parse_scenario,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (1024, 1024),
        ("1024", 1024),
        ("512MiB", 512 * 2**20),
        ("2 GB", 2 * 10**9),
        ("1.5GiB", 3 * 2**29),
        ("64kib", 64 * 1024),
    ],
)
def test_parse_bytes(text, expected) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["lots", "12 parsecs", -1, True, "MiB", ""])
def test_parse_bytes_rejects(bad) -> None:
    with pytest.raises(ValueError):
        parse_bytes(bad)


def test_demo_scenario_has_three_heterogeneous_nodes() -> None:
    scenario = load_scenario()
    assert DEFAULT_SCENARIO.name == "demo.yaml" and DEFAULT_SCENARIO.parent.name == "scenarios"
    a, b, c = scenario.workers
    assert [w.node_id for w in scenario.workers] == ["node-a", "node-b", "node-c"]
    assert (a.slowdown, b.slowdown, c.slowdown) == (1.0, 2.0, 1.0)
    assert a.trusted and not b.trusted and not c.trusted
    assert c.memory_bytes < a.memory_bytes and c.memory_bytes < b.memory_bytes
    assert len({a.watts, b.watts, c.watts}) == 3
    # The file says why each field is there.
    assert DEFAULT_SCENARIO.read_text().lstrip().startswith("#")


def test_demo_scenario_forces_a_split_of_smollm2() -> None:
    """No node alone, nor node-a with node-c, holds SmolLM2-135M's ~710 MiB; all three do."""
    need = 710 * 2**20
    mem = {w.node_id: w.memory_bytes for w in load_scenario().workers}
    assert max(mem.values()) < need
    assert mem["node-a"] + mem["node-c"] < need
    assert sum(mem.values()) > need * 1.3  # room for a longer context than the default


def test_worker_environment_carries_the_capacity() -> None:
    spec = WorkerSpec.model_validate(
        {"id": "n1", "slowdown": 2.5, "memory": "1GiB", "trusted": True, "watts": 7,
         "bandwidth_mbps": 20, "rtt_ms": 10, "cores": 2, "env": {"EDGEORCH_LOG_LEVEL": "DEBUG"}}
    )  # fmt: skip
    assert spec.environment() == {
        "EDGEORCH_EMULATION_SLOWDOWN": "2.5",
        "EDGEORCH_TRUSTED": "true",
        "EDGEORCH_WATTS": "7.0",
        "EDGEORCH_EMULATION_RTT_MS": "10.0",
        "EDGEORCH_MEMORY_BYTES": str(2**30),
        "EDGEORCH_EMULATION_BANDWIDTH_MBPS": "20.0",
        "EDGEORCH_CORES": "2",
        "EDGEORCH_LOG_LEVEL": "DEBUG",
    }


def test_worker_environment_leaves_defaults_to_the_worker() -> None:
    env = WorkerSpec(node_id="n1").environment()
    assert "EDGEORCH_MEMORY_BYTES" not in env and "EDGEORCH_EMULATION_BANDWIDTH_MBPS" not in env
    assert env["EDGEORCH_TRUSTED"] == "false"


def test_worker_env_values_are_what_the_worker_settings_read(monkeypatch) -> None:
    from services.worker.app import WorkerSettings

    spec = WorkerSpec.model_validate({"id": "n1", "slowdown": 3, "memory": "256MiB", "trusted": True})
    for key, value in spec.environment().items():
        monkeypatch.setenv(key, value)
    settings = WorkerSettings()
    assert settings.emulation_slowdown == 3.0
    assert settings.memory_bytes == 256 * 2**20
    assert settings.trusted is True


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"workers": []}, "workers"),
        ({"workers": [{"id": "a"}, {"id": "a"}]}, "repeated: ['a']"),
        ({"workers": [{"id": "a", "slowdown": 0.5}]}, "workers.0.slowdown"),
        ({"workers": [{"id": "a", "speed": 2}]}, "workers.0.speed"),
        ({"workers": [{"id": "a/../b"}]}, "workers.0.id"),
        ({"workers": [{"id": "a", "memory": "much"}]}, "not a size"),
        (["a", "b"], "expected a mapping"),
    ],
)
def test_invalid_scenarios_say_what_is_wrong(data, message) -> None:
    with pytest.raises(ScenarioError, match="my.yaml") as err:
        parse_scenario(data, "my.yaml")
    assert message in str(err.value)


def test_load_scenario_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read scenario"):
        load_scenario(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers: [\n")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(bad)


def test_with_workers_keeps_the_first_or_adds_full_speed_nodes() -> None:
    scenario = load_scenario()
    assert [w.node_id for w in scenario.with_workers(2).workers] == ["node-a", "node-b"]
    five = scenario.with_workers(5).workers
    assert [w.node_id for w in five] == ["node-a", "node-b", "node-c", "node-d", "node-e"]
    assert five[3].slowdown == 1.0 and five[3].memory_bytes is None and not five[3].trusted
    assert scenario.with_workers(3) == scenario
    with pytest.raises(ScenarioError):
        scenario.with_workers(0)


def test_with_workers_skips_names_the_file_uses() -> None:
    scenario = parse_scenario({"workers": [{"id": "node-b"}]})
    assert [w.node_id for w in scenario.with_workers(3).workers] == ["node-b", "node-a", "node-c"]


def test_the_llama_7b_scenario_fits_four_nodes_none_of_which_holds_half() -> None:
    """scenarios/llama-7b.yaml: its model and policy, and memory that forces a four-way split."""
    from transformers import LlamaConfig

    from edgeorch.engine.synth import _COMMON, SHAPES
    from edgeorch.models.llama import LlamaAdapter

    scenario = load_scenario(DEFAULT_SCENARIO.parent / "llama-7b.yaml")
    assert scenario.model == "llama-7b" and scenario.policy is not None
    assert scenario.policy.weight_format == "int4"
    cfg = LlamaConfig(**{k: v for k, v in {**_COMMON, **SHAPES["llama-7b"]}.items() if k != "model_type"})
    profile = LlamaAdapter(cfg).profile("llama-7b", weight_format="int4").units
    weights = sum(u.param_bytes for u in profile)
    w = scenario.policy.workload
    kv = sum(u.kv_bytes_per_token for u in profile) * w.max_sessions * w.context_tokens
    offered = [spec.memory_bytes for spec in scenario.workers]
    assert len(offered) == 4 and max(offered) <= 1.3e9 < weights / 2
    assert sum(offered) > weights + kv
    # Each worker also enforces what it offers (a load past it is refused).
    assert all(int(spec.env["EDGEORCH_MEMORY"]) == spec.memory_bytes for spec in scenario.workers)
