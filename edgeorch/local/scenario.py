"""Scenario files: which emulated edge nodes a local stack starts, and with what capacity.

A scenario is a YAML file with a ``workers`` list (see ``scenarios/demo.yaml``)::

    workers:
      - id: node-a
        slowdown: 1.0
        memory: 320MiB
        trusted: true
        watts: 15

Each worker becomes one ``edgeorch worker`` process whose EDGEORCH_* settings
carry the capacity it reports to the monitor. Optional ``model`` and
``policy`` (a deployment's QoS policy: weight format, workload ...) say what
`edgeorch up` deploys on them; its ``--model`` and ``--format`` override.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgeorch.schemas.orchestrator import QosPolicy

DEFAULT_SCENARIO = Path(__file__).resolve().parents[2] / "scenarios" / "demo.yaml"
NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"  # also a log file name, so no dots or slashes

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


class ScenarioError(ValueError):
    """A scenario file that cannot be read or does not describe a valid set of workers."""


def parse_bytes(value: int | str) -> int:
    """``512MiB``, ``2 GB``, ``1048576`` → bytes."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative: {value}")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {value!r} (use e.g. 512MiB, 2GB or a number of bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class WorkerSpec(BaseModel):
    """One emulated edge node: its id and the capacity it reports and emulates."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    node_id: str = Field(alias="id", pattern=NODE_ID_PATTERN)
    slowdown: float = Field(default=1.0, ge=1.0, allow_inf_nan=False, description="compute k× slower")
    memory_bytes: int | None = Field(
        default=None, alias="memory", description="memory the node offers; default: the host's"
    )
    trusted: bool = False
    watts: float = Field(default=10.0, ge=0, allow_inf_nan=False)
    bandwidth_mbps: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    rtt_ms: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    cores: int | None = Field(default=None, ge=1)
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for this worker")

    @field_validator("memory_bytes", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int | None:
        return None if value is None else parse_bytes(value)

    def environment(self) -> dict[str, str]:
        """The worker's EDGEORCH_* capacity settings (identity and URLs are the launcher's)."""
        env = {
            "EDGEORCH_EMULATION_SLOWDOWN": repr(self.slowdown),
            "EDGEORCH_TRUSTED": "true" if self.trusted else "false",
            "EDGEORCH_WATTS": repr(self.watts),
            "EDGEORCH_EMULATION_RTT_MS": repr(self.rtt_ms),
        }
        if self.memory_bytes is not None:
            env["EDGEORCH_MEMORY_BYTES"] = str(self.memory_bytes)
        if self.bandwidth_mbps is not None:
            env["EDGEORCH_EMULATION_BANDWIDTH_MBPS"] = repr(self.bandwidth_mbps)
        if self.cores is not None:
            env["EDGEORCH_CORES"] = str(self.cores)
        return {**env, **self.env}


class Scenario(BaseModel):
    """The workers a local stack starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    workers: list[WorkerSpec] = Field(min_length=1)
    model: str | None = Field(default=None, description="what `edgeorch up` deploys (default smollm2-135m)")
    policy: QosPolicy | None = Field(default=None, description="the QoS policy `edgeorch up` deploys under")

    @field_validator("workers")
    @classmethod
    def _unique_ids(cls, workers: list[WorkerSpec]) -> list[WorkerSpec]:
        ids = [w.node_id for w in workers]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"node ids must be unique; repeated: {dupes}")
        return workers

    def with_workers(self, n: int) -> Scenario:
        """The first ``n`` workers; past the file's, more full-speed untrusted nodes (node-d, node-e, ...)."""
        if n < 1:
            raise ScenarioError(f"a stack needs at least one worker, not {n}")
        workers = list(self.workers[:n])
        taken = {w.node_id for w in workers}
        for i in range(n * 2 + 26):  # enough candidate names to skip the taken ones
            if len(workers) == n:
                break
            name = f"node-{string.ascii_lowercase[i]}" if i < 26 else f"node-{i}"
            if name not in taken:
                workers.append(WorkerSpec(node_id=name))
                taken.add(name)
        return self.model_copy(update={"workers": workers})


def parse_scenario(data: Any, source: str = "scenario") -> Scenario:
    """A scenario from already-parsed YAML; :class:`ScenarioError` says what is wrong and where."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: expected a mapping with a 'workers' list, got {type(data).__name__}")
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()
        )
        raise ScenarioError(f"{source}: {problems}") from exc


def load_scenario(path: Path | str | None = None) -> Scenario:
    """Read a scenario file (default: ``scenarios/demo.yaml`` at the repository root)."""
    path = Path(path) if path is not None else DEFAULT_SCENARIO
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not valid YAML: {exc}") from exc
    return parse_scenario(data, str(path))
