"""Helpers for the rollout tests: a broadcast process, its workers, sessions that time every token."""

from __future__ import annotations

import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import torch

from edgeorch.local.launcher import LocalService, LocalWorkers
from edgeorch.rollout.plan import parse_stage_id
from edgeorch.schemas.stage import Sampling
from edgeorch.security.credentials import stage_credential
from edgeorch.transport.client import ChainClient
from tests.support import ServiceProcess, free_port

REDIS_URL = "redis://127.0.0.1:6379/0"
PG_URL = "postgresql://root@127.0.0.1:5432/test"

# Short timers so a test sees every phase in seconds.
BROADCAST_KNOBS = {
    "EDGEORCH_PREPARE_TIMEOUT_S": "30",
    "EDGEORCH_DRAIN_TIMEOUT_S": "60",
    "EDGEORCH_DRAIN_GRACE_S": "1.5",
    "EDGEORCH_PROBE_INTERVAL_S": "0.5",
    "EDGEORCH_PROBE_TIMEOUT_S": "1.0",
    "EDGEORCH_DEAD_AFTER_FAILURES": "2",
    "EDGEORCH_TICK_S": "0.1",
}


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 0.05):
    """Poll until predicate() is truthy and return it; fail after the timeout, saying what was awaited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"not within {timeout_s}s: {what}")


def unique(prefix: str) -> str:
    """A deployment name no parallel run uses (they share Redis)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class PgSchema:
    """A throw-away PostgreSQL schema, so parallel runs never share tables."""

    def __init__(self) -> None:
        self.name = f"eo_bc_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {self.name}")
        self.url = f"{PG_URL}?options=-csearch_path%3D{self.name}"

    def drop(self) -> None:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {self.name} CASCADE")


@dataclass
class Rig:
    """A broadcast process and the workers that follow it, with the shared secret."""

    broadcast: ServiceProcess
    workers: LocalWorkers
    secret: str
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.broadcast.url

    def node(self, name: str) -> LocalService:
        return next(w for w in self.workers.workers if w.name == name)

    def rollout(self, deployment: str, model: str, stages: list[tuple[LocalService, int, int]]) -> dict:
        plan = {"model": model, "stages": [{"node": w.name, "url": w.url, "start": a, "end": b}
                                           for w, a, b in stages]}  # fmt: skip
        resp = httpx.post(
            f"{self.url}/v1/rollouts", json={"deployment": deployment, "plan": plan}, timeout=30
        )
        assert resp.status_code == 201, resp.text
        return resp.json()

    def get(self, rollout_id: str) -> dict:
        return httpx.get(f"{self.url}/v1/rollouts/{rollout_id}", timeout=30).json()

    def wait_phase(self, rollout_id: str, phases=("completed", "aborted"), timeout_s: float = 90.0) -> dict:
        return wait_for(
            lambda: (v := self.get(rollout_id))["phase"] in phases and v,
            timeout_s, f"rollout {rollout_id} reaching {phases}\n{self.broadcast.log_tail()}",
        )  # fmt: skip

    def deployment(self, name: str) -> dict:
        """Broadcast's view of a deployment, its entry with the data-plane credential added."""
        resp = httpx.get(f"{self.url}/v1/deployments/{name}", timeout=30)
        assert resp.status_code == 200, resp.text
        return with_credential(resp.json(), self.secret)

    def converged(self, deployment: str, version: int) -> bool:
        """Every live worker holds exactly its stages of ``version`` of ``deployment``, nothing older."""
        want = {}
        for s in self.deployment(deployment)["stages"]:
            want.setdefault(s["node"], set()).add(s["stage_id"])
        if self.deployment(deployment)["active_version"] != version:
            return False
        for w in self.workers.workers:
            if w.proc.poll() is not None:
                continue
            if held(w, deployment) != want.get(w.name, set()):
                return False
        return True


def held(worker: LocalService, deployment: str) -> set[str]:
    """The stage ids of ``deployment`` loaded on a worker."""
    stages = httpx.get(f"{worker.url}/v1/stages", timeout=30).json()
    return {
        s["stage_id"]
        for s in stages
        if (ref := parse_stage_id(s["stage_id"])) and ref.deployment == deployment
    }


def start_rig(log_dir: Path, n_workers: int, db_url: str | None = None, **knobs: str) -> Rig:
    """A broadcast process (SQLite unless ``db_url``) and ``n_workers`` workers following it."""
    secret = secrets.token_hex(16)
    env = {
        "EDGEORCH_DATABASE_URL": db_url or f"sqlite:///{log_dir / 'broadcast.db'}",
        "EDGEORCH_REDIS_URL": REDIS_URL,
        "EDGEORCH_ROLLOUT_SECRET": secret,
        **BROADCAST_KNOBS,
        **knobs,
    }
    bc = ServiceProcess(["broadcast"], free_port(), env, log_dir / "broadcast.log")
    try:
        bc.wait_ready()
        wenv = worker_env(bc.url, secret)
        workers = LocalWorkers(n_workers, threads=1, log_dir=log_dir, extra_env=wenv)
    except BaseException:
        bc.kill()
        raise
    return Rig(bc, workers, secret, log_dir, env)


def worker_env(broadcast_url: str, secret: str, **extra: str) -> dict[str, str]:
    """What a worker needs to follow a broadcast service (pulling every second)."""
    return {
        "EDGEORCH_BROADCAST_URL": broadcast_url,
        "EDGEORCH_ROLLOUT_SECRET": secret,
        "EDGEORCH_ROLLOUT_PULL_INTERVAL_S": "1.0",
        "EDGEORCH_REDIS_URL": REDIS_URL,
        "EDGEORCH_TORCH_THREADS": "1",
        **extra,
    }


def metric(worker: LocalService, name: str, **labels: str) -> float:
    """One sample of a worker's Prometheus metric (0 when absent)."""
    text = httpx.get(f"{worker.url}/metrics", timeout=30).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" ([0-9.e+-]+)"
    m = re.search(pattern, text)
    return float(m.group(1)) if m else 0.0


def with_credential(deployment: dict, secret: str) -> dict:
    """A broadcast deployment view whose entry carries its stage credential, as the gateway derives it."""
    entry = deployment["entry"]
    return {**deployment, "entry": {**entry, "credential": stage_credential(secret, entry["stage_id"])}}


def entry_client(entry: dict) -> ChainClient:
    """A client of the chain entered at ``entry`` ({url, stage_id, credential if the stage has one})."""
    return ChainClient(entry["url"], entry["stage_id"], credential=entry.get("credential"))


def generate(entry: dict, prompt_ids: list[int], n_tokens: int) -> list[int]:
    """Greedy tokens from a chain entered at ``entry`` ({url, stage_id[, credential]})."""
    with entry_client(entry) as client:
        return client.generate(prompt_ids, n_tokens).token_ids


@dataclass
class Run:
    """One generation of one session: which version served it, its tokens, when each arrived."""

    session: int
    version: int
    tokens: list[int]
    times: list[float]
    started: float


@dataclass
class SessionLoop:
    """Sessions that generate back to back, each time entering the deployment's active version."""

    broadcast_url: str
    deployment: str
    prompts: list[list[int]]
    n_tokens: int
    secret: str = ""  # the rollout secret the entry's credential derives from
    runs: list[Run] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for i in range(len(self.prompts)):
            t = threading.Thread(target=self._loop, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)

    def join(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def every_session(self, pred) -> bool:
        """Whether every session has finished at least one run for which ``pred(run)`` holds."""
        with self._lock:
            return {r.session for r in self.runs if pred(r)} == set(range(len(self.prompts)))

    def _loop(self, i: int) -> None:
        with httpx.Client(timeout=30) as http:
            while not self.stop.is_set():
                started = time.time()
                try:
                    dep = http.get(f"{self.broadcast_url}/v1/deployments/{self.deployment}").json()
                    dep = with_credential(dep, self.secret)
                    tokens, times = _timed_generate(dep["entry"], self.prompts[i], self.n_tokens)
                except Exception as exc:  # every failure is a test failure; keep counting
                    with self._lock:
                        self.failures.append(f"session {i}: {exc!r}")
                    time.sleep(0.2)
                    continue
                with self._lock:
                    self.runs.append(Run(i, dep["active_version"], tokens, times, started))


def _timed_generate(entry: dict, prompt_ids: list[int], n_tokens: int) -> tuple[list[int], list[float]]:
    session = uuid.uuid4().hex
    x = torch.tensor([prompt_ids], dtype=torch.int64)
    tokens, times, position = [], [], 0
    with entry_client(entry) as client:
        for i in range(n_tokens):
            res = client.step({"x": x}, session=session, position=position, mode="generate",
                              sampling=Sampling().model_dump(), release=i == n_tokens - 1)  # fmt: skip
            token = int(res.frame.meta["token"])
            tokens.append(token)
            times.append(time.time())
            position += x.shape[1]
            x = torch.tensor([[token]], dtype=torch.int64)
    return tokens, times


def pauses(runs: list[Run], window: tuple[float, float]) -> dict[str, float]:
    """Largest gap between consecutive tokens of any session inside and before a time window.

    A gap belongs to the window when it overlaps it; the gap between two
    generations of one session (a new prefill) counts, as a user would see it.
    """
    inside, before, all_gaps = 0.0, 0.0, []
    for s in {r.session for r in runs}:
        times = sorted(t for r in runs if r.session == s for t in [r.started, *r.times])
        for a, b in zip(times, times[1:], strict=False):
            all_gaps.append(b - a)
            if b >= window[0] and a <= window[1]:
                inside = max(inside, b - a)
            elif b < window[0]:
                before = max(before, b - a)
    all_gaps.sort()
    median = all_gaps[len(all_gaps) // 2] if all_gaps else 0.0
    return {"max_pause_during_cutover_s": inside, "max_gap_before_rollout_s": before, "median_gap_s": median}
