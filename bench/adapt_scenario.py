"""Scenario files of the adaptation benchmark: a cluster plus a timeline of timed changes.

A file in ``bench/scenarios/`` (see ``node_slowdown.yaml``)::

    description: one of three nodes becomes 4x slower
    duration_s: 40          # load runs this long (seconds since the first request)
    warmup_s: 3             # requests that start earlier are recorded but left out of the statistics
    sessions: 2             # closed-loop chat sessions at the start
    weight_format: fp32     # the deployment's weights under every strategy (default fp32, exact)
    prompt_tokens: 250      # optional: long prompts of about this many tokens (prefill-heavy load)
    workers:                # the same fields as scenarios/*.yaml (edgeorch.local.scenario.WorkerSpec)
      - {id: n1, memory: 360MB}
    timeline:
      - {at_s: 15, kind: slowdown, node: "@busiest", factor: 4}

Event kinds and their fields: ``slowdown`` (node, factor), ``link`` (node,
bandwidth_mbps and/or rtt_ms: the node's outgoing link), ``kill`` (node),
``join`` (spec: a worker entry), ``load`` (sessions). ``node`` is a node id or
a role in the deployment's plan at the moment the event fires, so every
strategy meets the same adversity on its own plan: ``@busiest`` (most units),
``@first``, ``@middle`` (stage n//2), ``@last``, ``@spare`` (running, not in
the plan), and for ``link`` and ``slowdown`` events ``@all`` (every running
node at once: a shared uplink or a site-wide change, one phase).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgeorch.local.scenario import NODE_ID_PATTERN, Scenario, ScenarioError, WorkerSpec, parse_scenario
from edgeorch.schemas.profile import WeightFormat

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
ROLES = ("@busiest", "@first", "@middle", "@last", "@spare", "@all")
EventKind = Literal["slowdown", "link", "kill", "join", "load"]
_F = {"allow_inf_nan": False}


class TimelineEvent(BaseModel):
    """One timed change to the cluster or the load."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at_s: float = Field(ge=0, **_F)
    kind: EventKind
    node: str | None = None
    factor: float | None = Field(default=None, ge=1.0, le=1000.0, **_F)
    bandwidth_mbps: float | None = Field(default=None, gt=0, **_F)
    rtt_ms: float | None = Field(default=None, ge=0, **_F)
    spec: WorkerSpec | None = None
    sessions: int | None = Field(default=None, ge=1, le=64)

    @field_validator("node")
    @classmethod
    def _node(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("@"):
            WorkerSpec.model_validate({"id": value})  # the same id rules as a worker's
        elif value is not None and value not in ROLES:
            raise ValueError(f"unknown role {value!r}; roles: {', '.join(ROLES)}")
        return value

    @model_validator(mode="after")
    def _fields_of_kind(self) -> TimelineEvent:
        needs = {"slowdown": ("node", "factor"), "link": ("node",), "kill": ("node",), "join": ("spec",),
                 "load": ("sessions",)}[self.kind]  # fmt: skip
        missing = [f for f in needs if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a {self.kind} event needs {', '.join(missing)}")
        if self.node == "@all" and self.kind not in ("link", "slowdown"):
            raise ValueError(
                f"@all (every running node at once) is for link and slowdown events, not {self.kind}"
            )
        if self.kind == "link" and self.bandwidth_mbps is None and self.rtt_ms is None:
            raise ValueError("a link event needs bandwidth_mbps or rtt_ms")
        allowed = {"at_s", "kind", *needs, *(("bandwidth_mbps", "rtt_ms") if self.kind == "link" else ())}
        extra = [f for f in ("node", "factor", "bandwidth_mbps", "rtt_ms", "spec", "sessions")
                 if f not in allowed and getattr(self, f) is not None]  # fmt: skip
        if extra:
            raise ValueError(f"a {self.kind} event does not take {', '.join(extra)}")
        return self

    def label(self) -> str:
        """A short human name: ``slowdown ×4 @busiest``, ``join n5``."""
        if self.kind == "slowdown":
            return f"slowdown ×{self.factor:g} {self.node}"
        if self.kind == "link":
            parts = [f"{self.bandwidth_mbps:g} Mbit/s" if self.bandwidth_mbps is not None else "",
                     f"RTT {self.rtt_ms:g} ms" if self.rtt_ms is not None else ""]  # fmt: skip
            return f"link {self.node} {', '.join(p for p in parts if p)}"
        if self.kind == "kill":
            return f"kill {self.node}"
        if self.kind == "join":
            return f"join {self.spec.node_id}"
        return f"load {self.sessions} sessions"


class AdaptScenario(BaseModel):
    """A cluster, the load on it, and what happens to it when."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NODE_ID_PATTERN)
    description: str = ""
    duration_s: float = Field(gt=0, **_F)
    warmup_s: float = Field(default=3.0, ge=0, **_F)
    sessions: int = Field(default=2, ge=1, le=64)
    max_tokens: int = Field(default=24, ge=1, le=512)
    prompt_tokens: int | None = Field(
        default=None, ge=16, le=4096,
        description="about this many prompt tokens per request (prose from bench/data/quality_text.txt); "
        "None: the short haiku request. Also the workload every strategy's plans are made for",
    )  # fmt: skip
    weight_format: WeightFormat = Field(
        default="fp32", description="the deployment's weight format, the same under every strategy"
    )
    cluster: Scenario
    timeline: list[TimelineEvent] = Field(min_length=1)

    @model_validator(mode="after")
    def _ordered_and_inside(self) -> AdaptScenario:
        times = [e.at_s for e in self.timeline]
        if times != sorted(times):
            raise ValueError(f"timeline events must be in time order; got at_s {times}")
        if not (self.warmup_s < times[0] and times[-1] < self.duration_s):
            raise ValueError(f"events must lie after warmup_s ({self.warmup_s}) and before duration_s "
                             f"({self.duration_s}); got at_s {times}")  # fmt: skip
        ids = {w.node_id for w in self.cluster.workers}
        for e in self.timeline:
            if e.kind == "join" and e.spec.node_id in ids:
                raise ValueError(f"join of {e.spec.node_id!r}: that node id is taken")
            if e.kind == "join":
                ids.add(e.spec.node_id)
        return self

    def scaled(self, factor: float, sessions: int | None = None) -> AdaptScenario:
        """Every time (events, duration; not the warm-up) × ``factor``; optionally another session count."""
        if factor <= 0:
            raise ScenarioError(f"a duration scale must be positive, not {factor}")
        timeline = [e.model_copy(update={"at_s": e.at_s * factor}) for e in self.timeline]
        data = {"timeline": timeline, "duration_s": self.duration_s * factor}
        if sessions is not None:
            data["sessions"] = sessions
        out = self.model_copy(update=data)
        try:
            return AdaptScenario.model_validate(out.model_dump(by_alias=True))  # re-checks the time rules
        except ValidationError as exc:
            raise ScenarioError(f"{self.name} scaled ×{factor:g}: {exc.errors()[0]['msg']}") from exc

    def max_sessions(self) -> int:
        """The most sessions that run at once over the timeline."""
        return max([self.sessions, *(e.sessions for e in self.timeline if e.kind == "load")])


def parse_adapt_scenario(data: Any, name: str, source: str = "scenario") -> AdaptScenario:
    """A benchmark scenario from parsed YAML; the ``workers`` list goes through edgeorch.local.scenario."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    cluster = parse_scenario({"description": data.get("description", ""), "workers": data.pop("workers", None)},
                             source)  # fmt: skip
    try:
        return AdaptScenario.model_validate({"name": name, **data, "cluster": cluster})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()
        )
        raise ScenarioError(f"{source}: {problems}") from exc


def load_adapt_scenario(name_or_path: str | Path) -> AdaptScenario:
    """``node_slowdown`` (from bench/scenarios/) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = SCENARIO_DIR / f"{name_or_path}.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not valid YAML: {exc}") from exc
    return parse_adapt_scenario(data, path.stem, str(path))


def scenario_names() -> list[str]:
    """The scenarios shipped in bench/scenarios/, in file-name order."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


def resolve_node(selector: str, stages: list[dict], running: list[str]) -> str | None:
    """The node a timeline event means now: an id as is (if running), or a role in the plan.

    ``stages``: the deployment's active stages (``node``, ``start``, ``end``), entry
    first. None when the role has no node (no plan, no spare) or the id is not running.
    """
    if not selector.startswith("@"):
        return selector if selector in running else None
    if selector == "@all":
        return ",".join(running) if running else None
    if selector == "@spare":
        used = {s["node"] for s in stages}
        spare = sorted(n for n in running if n not in used)
        return spare[0] if spare else None
    if not stages:
        return None
    if selector == "@busiest":  # ties go to the earlier stage
        return max(stages, key=lambda s: (s["end"] - s["start"], -stages.index(s)))["node"]
    index = {"@first": 0, "@middle": len(stages) // 2, "@last": len(stages) - 1}[selector]
    return stages[index]["node"]
