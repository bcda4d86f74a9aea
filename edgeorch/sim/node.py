"""One simulated node: registers, heartbeats, calibrates, reports links, prepares and acks rollouts.

It speaks the worker's protocol (edgeorch/runtime/agent.py and
rollout_agent.py) byte for byte as the control plane sees it: the same
routes, the same JSON bodies, the same signed desired-state pulls and acks.
What it does not do is compute: a calibration takes ``calibrate_s`` and
reports the spec's speed, a stage "loads" in ``prepare_s``, link figures
come from the fleet's link model instead of probes. Speeds, memory, trust,
links and failures are therefore whatever the benchmark sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from edgeorch.rollout.plan import parse_stage_id
from edgeorch.rollout.signing import SIGNATURE_HEADER, MessageVerifier, sign_bytes
from edgeorch.sim.http import HttpConnection, HttpError

log = logging.getLogger(__name__)

PREFILL_OVER_DECODE = 4.0  # prefill runs this much faster per flop than decode (batched tokens)


@dataclass
class SimNodeSpec:
    """What a simulated node is: capacity, speed, trust, power and its uplink."""

    node_id: str
    memory_bytes: int
    decode_flops_per_s: float
    cores: int = 4
    trusted: bool = False
    watts: float = 10.0
    uplink_rtt_s: float = 0.002  # this node's share of the RTT of any link it is on
    uplink_bytes_per_s: float = 100e6
    prepare_s: float = 0.3  # seconds to "load and warm" one stage


@dataclass
class SimConfig:
    """Where the control plane is and the worker protocol's periods."""

    monitor_url: str
    broadcast_url: str
    secret: str
    heartbeat_interval_s: float = 1.0  # the worker's AgentConfig default
    pull_interval_s: float = 5.0  # the worker's RolloutAgentConfig default
    calibrate_s: float = 1.0
    timeout_s: float = 10.0


LinkModel = Callable[[str, str], "tuple[float, float] | None"]  # (src, dst) -> (rtt_s, bytes/s)


@dataclass
class BeatRecord:
    """One heartbeat as the node saw it: when it was sent and how long the monitor took to answer."""

    sent_at: float
    latency_s: float
    ok: bool


@dataclass
class SimNodeState:
    """What changes while the node runs."""

    slowdown: float = 1.0  # speed divisor: 2.0 reports half the spec's speed
    healthy: bool = True  # False: /healthz answers 503
    fail_prepare: bool = False  # True: every PREPARE is acked with an error
    stages: set[str] = field(default_factory=set)
    calibrated: set[str] = field(default_factory=set)
    pending_profiles: list[dict] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)


class SimNode:
    """A node's agent loops; its HTTP side is served by the fleet's shared server."""

    def __init__(self, spec: SimNodeSpec, cfg: SimConfig, url: str, link_model: LinkModel,
                 beats: list[BeatRecord]):  # fmt: skip
        self.spec = spec
        self.cfg = cfg
        self.url = url
        self.link_model = link_model
        self.beats = beats
        self.state = SimNodeState()
        self.verifier = MessageVerifier(cfg.secret)
        self._monitor = HttpConnection(cfg.monitor_url, cfg.timeout_s)
        self._broadcast = HttpConnection(cfg.broadcast_url, cfg.timeout_s)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._acked: set[str] = set()
        self._links_for: tuple[str, ...] = ()
        self._links: list[dict] = []
        self.registered = False

    @property
    def running(self) -> bool:
        """True between start() and stop()."""
        return bool(self._tasks)

    async def start(self) -> None:
        """Start heartbeating and reconciling, each at a random phase (nodes do not beat in lockstep)."""
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self._reconcile_loop()),
        ]

    async def stop(self) -> None:
        """Go silent, as a node that crashed or left: no goodbye, the monitor notices by itself."""
        pending = set(self._tasks)
        while pending:
            # Again and again: Python 3.11's wait_for can swallow a cancel that lands as its inner
            # request completes, and the loop then beats on (seen at 1,000 nodes: a removed node
            # kept heartbeating and the fleet's stop never returned).
            for t in pending:
                t.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
        self._tasks = []
        self._monitor.close()
        self._broadcast.close()

    def wake(self) -> None:
        """A verified rollout notification arrived: pull the desired state now."""
        self._wake.set()

    # ----- monitor ---------------------------------------------------------------

    async def _register(self) -> None:
        s = self.spec
        body = orjson.dumps({"node_id": s.node_id, "url": self.url, "capacity": {
            "cores": s.cores, "memory_bytes": s.memory_bytes, "trusted": s.trusted, "watts": s.watts}})  # fmt: skip
        status, text = await self._monitor.request("POST", "/v1/nodes", body)
        if status != 200:
            raise HttpError(f"registration answered {status}: {text[:200]!r}")
        self.registered = True

    def heartbeat_body(self) -> bytes:
        """The heartbeat JSON (the fields of edgeorch.schemas.monitor.Heartbeat)."""
        decode = self.spec.decode_flops_per_s / self.state.slowdown
        speeds = {m: {"decode_flops_per_s": decode, "prefill_flops_per_s": decode * PREFILL_OVER_DECODE,
                      "samples": 9} for m in self.state.calibrated}  # fmt: skip
        profiles, self.state.pending_profiles = self.state.pending_profiles, []
        used = len(self.state.stages) * (self.spec.memory_bytes // 8)
        return orjson.dumps({
            "cpu_percent": 20.0 * self.state.slowdown, "memory_free_bytes": max(0, self.spec.memory_bytes - used),
            "rss_bytes": used, "planned_bytes": used, "queue_depth": 0, "sessions": 0,
            "speeds": speeds, "links": self._link_samples(), "profiles": profiles,
        })  # fmt: skip

    def _link_samples(self) -> list[dict]:
        """The link estimates a worker would have measured to each peer the monitor named."""
        peers = tuple(self.state.peers)
        if peers != self._links_for:  # recomputed only when the peer set changes
            self._links_for, self._links = peers, []
            for dst in peers:
                figures = self.link_model(self.spec.node_id, dst)
                if figures is not None:
                    rtt, bw = figures
                    self._links.append({"dst": dst, "rtt_s": rtt, "bandwidth_bytes_per_s": bw, "samples": 7})
        return self._links

    async def beat_once(self) -> None:
        """Register if needed, send one heartbeat, take the reply's orders (peers, calibrations)."""
        if not self.registered:
            await self._register()
        body = self.heartbeat_body()
        t0 = time.perf_counter()
        status, text = await self._monitor.request("POST", f"/v1/nodes/{self.spec.node_id}/heartbeat", body)
        self.beats.append(BeatRecord(time.time(), time.perf_counter() - t0, status == 200))
        if status == 404:  # the monitor forgot us: register again, as a worker does
            self.registered = False
            return
        if status != 200:
            raise HttpError(f"heartbeat answered {status}: {text[:200]!r}")
        reply = orjson.loads(text)
        self.state.peers = [p["node_id"] for p in reply["peers"]]
        for model in reply["profile_models"]:
            if model not in self.state.calibrated:
                self.state.calibrated.add(model)  # reported once the calibration "finishes"
                asyncio.get_running_loop().call_later(self.cfg.calibrate_s, self._calibrated, model)

    def _calibrated(self, model: str) -> None:
        decode = self.spec.decode_flops_per_s / self.state.slowdown
        self.state.pending_profiles.append({
            "model": model, "prefill_tokens": 64, "decode_context": 64, "units": [],
            "decode_flops_per_s": decode, "prefill_flops_per_s": decode * PREFILL_OVER_DECODE,
            "seconds_per_token_decode": 0.0, "took_s": self.cfg.calibrate_s,
        })  # fmt: skip

    async def _heartbeat_loop(self) -> None:
        await asyncio.sleep(random.random() * self.cfg.heartbeat_interval_s)
        backoff = self.cfg.heartbeat_interval_s
        while True:
            started = time.monotonic()
            try:
                await self.beat_once()
                backoff = self.cfg.heartbeat_interval_s
                await asyncio.sleep(max(0.0, self.cfg.heartbeat_interval_s - (time.monotonic() - started)))
            except Exception as exc:  # noqa: BLE001 - a simulated node must not go silent on an odd answer
                self.beats.append(BeatRecord(time.time(), time.monotonic() - started, False))
                if isinstance(exc, HttpError):
                    log.debug("%s: heartbeat failed (%s); retrying in %.1fs", self.spec.node_id, exc, backoff)
                else:
                    log.warning("%s: heartbeat failed unexpectedly", self.spec.node_id, exc_info=True)
                await asyncio.sleep(backoff * (0.8 + 0.4 * random.random()))
                backoff = min(backoff * 2, 10.0)

    # ----- broadcast ---------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        await asyncio.sleep(random.random() * self.cfg.pull_interval_s)
        while True:
            self._wake.clear()
            try:
                await self.reconcile()
            except (HttpError, ValueError, KeyError) as exc:
                log.debug("%s: reconcile failed: %r", self.spec.node_id, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.cfg.pull_interval_s)

    async def reconcile(self) -> None:
        """Pull the signed desired state, load what is missing, drop what is unwanted, ack PREPAREs."""
        status, text = await self._broadcast.request("GET", f"/v1/nodes/{self.spec.node_id}/desired")
        if status != 200:
            raise HttpError(f"desired state answered {status}")
        doc = orjson.loads(text)
        problem = self.verifier.check_desired(doc, self.spec.node_id)
        if problem is not None:
            log.warning("%s: rejected desired state: %s", self.spec.node_id, problem)
            return
        entries, _ = self.verifier.fresh_entries(doc)
        wanted = {s["stage_id"] for e in entries for s in e["stages"]}
        missing = wanted - self.state.stages
        if missing and not self.state.fail_prepare:
            await asyncio.sleep(self.spec.prepare_s * len(missing))
            self.state.stages |= missing
        managed = {e["name"] for e in entries}
        for sid in list(self.state.stages):
            ref = parse_stage_id(sid)
            if ref is not None and ref.deployment in managed and sid not in wanted:
                self.state.stages.discard(sid)
        for e in entries:
            await self._ack(e)

    async def _ack(self, entry: dict) -> None:
        prep = entry.get("prepare")
        if not prep or prep["rollout_id"] in self._acked:
            return
        mine = [s["stage_id"] for s in entry["stages"] if s["version"] == prep["version"]]
        missing = [sid for sid in mine if sid not in self.state.stages]
        error = f"stages not loaded: {missing}" if missing else None
        ack = {"rollout_id": prep["rollout_id"], "node_id": self.spec.node_id, "ok": error is None,
               "prepare_s": self.spec.prepare_s * len(mine), "bytes_read": 0, "error": error}  # fmt: skip
        body = orjson.dumps(ack)
        headers = {SIGNATURE_HEADER: sign_bytes(body, self.cfg.secret)}
        status, _ = await self._broadcast.request(
            "POST", f"/v1/rollouts/{prep['rollout_id']}/acks", body, headers
        )
        if status == 200 or status in (404, 409):
            self._acked.add(prep["rollout_id"])
