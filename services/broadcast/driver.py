"""The loop that moves rollouts through their phases.

It gathers what the pure decisions in :mod:`edgeorch.rollout.state` need —
acks from the store, liveness probes of workers that have not acked yet,
session counts of the old version's stages — applies the decision as one
store transaction, then publishes the signed notification. It is the only
writer of phases; an ack or a new rollout only wakes it up early.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import httpx

from edgeorch.rollout.plan import node_urls, place
from edgeorch.rollout.signing import new_message
from edgeorch.rollout.state import (
    COMMITTED,
    PREPARING,
    AckState,
    IllegalTransition,
    decide_drain,
    decide_prepare,
)
from edgeorch.schemas.rollout import RolloutView
from edgeorch.security.certs import client_verify
from edgeorch.service import bus
from services.broadcast.metrics import BroadcastMetrics
from services.broadcast.store import NotFound, RolloutStore

log = logging.getLogger(__name__)


@dataclass
class DriverConfig:
    """Timing knobs of the driver (see BroadcastSettings for what each means)."""

    secret: str
    drain_timeout_s: float
    drain_grace_s: float
    probe_interval_s: float
    probe_timeout_s: float
    dead_after_failures: int
    tick_s: float


class RolloutDriver:
    """Advances every in-flight rollout; runs as one background task of the app."""

    def __init__(
        self,
        store: RolloutStore,
        publisher: bus.ResilientPublisher,
        metrics: BroadcastMetrics,
        cfg: DriverConfig,
    ):
        self.store = store
        self.publisher = publisher
        self.metrics = metrics
        self.cfg = cfg
        self._wake = asyncio.Event()
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(cfg.probe_timeout_s), verify=client_verify())
        # Probe and drain bookkeeping lives in memory: after a restart it
        # starts afresh, which only delays a decision by a probe interval.
        self._failures: dict[tuple[str, str], int] = {}
        self._dead: dict[tuple[str, str], str] = {}
        self._last_probe: dict[str, float] = {}
        self._last_drain_poll: dict[str, float] = {}
        # The nodes of each plan version a notification was addressed for (plans never change).
        self._plan_nodes: dict[tuple[str, int], frozenset[str]] = {}

    def poke(self) -> None:
        """Look at the rollouts now rather than at the next tick."""
        self._wake.set()

    async def close(self) -> None:
        """Close the probe client."""
        await self._http.aclose()

    async def run_forever(self) -> None:
        """Tick until cancelled; a failing tick is logged and retried with backoff."""
        failures = 0
        while True:
            self._wake.clear()
            try:
                await self.tick()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception:
                failures += 1
                log.exception("rollout driver tick failed (%d in a row)", failures)
            delay = self.cfg.tick_s if failures == 0 else min(self.cfg.tick_s * 2**failures, 10.0)
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    async def tick(self) -> None:
        """Advance every in-flight rollout once."""
        if not self.publisher.connected:
            await self.publisher.flush()
        rollouts = await asyncio.to_thread(self.store.in_flight)
        self.metrics.in_flight.set(len(rollouts))
        for r in rollouts:
            try:
                if r.phase == PREPARING:
                    await self._advance_prepare(r)
                elif r.phase == COMMITTED:
                    await self._advance_drain(r)
            except Exception:
                log.exception("could not advance rollout %s", r.id)

    async def publish(self, kind: str, r: RolloutView) -> None:
        """Publish a signed notification about rollout ``r`` (queued while Redis is away).

        It names the nodes whose desired state ``r`` changes, the new and the old
        version's, and only those wake and pull: with a thousand workers, a rollout
        touching ten of them no longer costs a thousand desired-state pulls per
        message. Every worker still pulls on its own timer, so one that missed
        a message converges anyway.
        """
        nodes = await asyncio.to_thread(self._touched, r)
        msg = new_message(kind, r.deployment, r.version, r.id, self.cfg.secret, nodes=nodes)
        await self.publisher.publish(bus.ROLLOUTS, msg)

    def _touched(self, r: RolloutView) -> list[str] | None:
        """Both versions' nodes; None (every node) when the old version's plan cannot be read."""
        nodes = set(r.nodes)
        if r.from_version is not None:
            key = (r.deployment, r.from_version)
            old = self._plan_nodes.get(key)
            if old is None:
                try:
                    old = frozenset(s.node for s in self.store.plan(*key).stages)
                except NotFound:
                    return None
                if len(self._plan_nodes) >= 1024:
                    self._plan_nodes.clear()
                self._plan_nodes[key] = old
            nodes |= old
        return sorted(nodes)

    # ----- PREPARE ---------------------------------------------------------

    async def _advance_prepare(self, r: RolloutView) -> None:
        now = time.time()
        acks = {a.node_id: AckState(a.ok, a.error) for a in r.acks}
        pending = [n for n in r.nodes if n not in acks]
        if pending and now - self._last_probe.get(r.id, 0.0) >= self.cfg.probe_interval_s:
            self._last_probe[r.id] = now
            await self._probe(r, pending)
        dead = {n: why for (rid, n), why in self._dead.items() if rid == r.id}
        decision = decide_prepare(r.nodes, acks, dead, time.time(), r.prepare_deadline)
        if decision.action == "commit":
            await self._commit(r)
        elif decision.action == "abort":
            await self._abort(r, decision.reason)

    async def _probe(self, r: RolloutView, pending: list[str]) -> None:
        urls = node_urls(await asyncio.to_thread(self.store.plan, r.deployment, r.version))
        problems = await asyncio.gather(*(self._probe_one(urls[n]) for n in pending))
        for node, problem in zip(pending, problems, strict=True):
            key = (r.id, node)
            if problem is None:
                self._failures.pop(key, None)
                continue
            self._failures[key] = self._failures.get(key, 0) + 1
            log.warning("rollout %s: probe of %s failed (%d): %s", r.id, node, self._failures[key], problem)
            if self._failures[key] >= self.cfg.dead_after_failures:
                self._dead[key] = problem

    async def _probe_one(self, url: str) -> str | None:
        try:
            resp = await self._http.get(f"{url}/healthz")
        except httpx.HTTPError as exc:
            return f"{url}: {exc!r}"
        return None if resp.status_code == 200 else f"{url}/healthz answered {resp.status_code}"

    async def _commit(self, r: RolloutView) -> None:
        done = await asyncio.to_thread(self.store.commit, r.id, time.time())
        await self.publish("commit", done)
        self.metrics.prepare_seconds.observe(done.prepare_s or 0.0)
        self.metrics.commit_seconds.observe(time.time() - (done.acked_at or done.committed_at))
        log.info(
            "rollout %s: COMMIT %s v%d (all %d nodes acked, prepare %.2fs); new sessions use v%d",
            r.id, r.deployment, r.version, len(r.nodes), done.prepare_s or 0.0, r.version,
        )  # fmt: skip
        self._forget(r.id)

    async def _abort(self, r: RolloutView, reason: str) -> None:
        await asyncio.to_thread(self.store.abort, r.id, reason, time.time())
        await self.publish("abort", r)
        self.metrics.rollouts.labels("aborted").inc()
        log.info("rollout %s: ABORT %s v%d: %s; v%s keeps serving", r.id, r.deployment, r.version, reason,
                 r.from_version)  # fmt: skip
        self._forget(r.id)

    def _forget(self, rollout_id: str) -> None:
        for key in [k for k in self._failures if k[0] == rollout_id]:
            del self._failures[key]
        for key in [k for k in self._dead if k[0] == rollout_id]:
            del self._dead[key]
        self._last_probe.pop(rollout_id, None)

    # ----- drain and RELEASE -----------------------------------------------

    async def _advance_drain(self, r: RolloutView) -> None:
        now = time.time()
        committed_at = r.committed_at or now
        sessions_left = None
        has_old = r.from_version is not None
        poll_due = now - self._last_drain_poll.get(r.id, 0.0) >= min(0.5, self.cfg.drain_grace_s or 0.5)
        if has_old and now >= committed_at + self.cfg.drain_grace_s and poll_due:
            self._last_drain_poll[r.id] = now
            sessions_left = await self._sessions_on(r.deployment, r.from_version)
        decision = decide_drain(now, committed_at, self.cfg.drain_grace_s, self.cfg.drain_timeout_s, has_old,
                                sessions_left)  # fmt: skip
        if decision.action != "complete":
            return
        try:
            done = await asyncio.to_thread(self.store.complete, r.id, decision.reason, time.time())
        except IllegalTransition:
            return  # a newer rollout superseded this drain meanwhile (it released the old version)
        await self.publish("release", done)
        self.metrics.rollouts.labels("completed").inc()
        self.metrics.drain_seconds.observe((done.finished_at or now) - committed_at)
        self._last_drain_poll.pop(r.id, None)
        released = f"v{r.from_version}" if has_old else "nothing"
        log.info("rollout %s: RELEASE %s of %s (%s)", r.id, released, r.deployment, decision.reason)

    async def _sessions_on(self, deployment: str, version: int) -> int:
        """Live sessions on a version's stages; an unreachable worker's sessions count as gone."""
        stages = place(deployment, version, await asyncio.to_thread(self.store.plan, deployment, version))

        async def count(url: str, sid: str) -> int:
            try:
                resp = await self._http.get(f"{url}/v1/stages/{sid}")
            except httpx.HTTPError as exc:
                log.warning("drain of %s: %s unreachable (%r); its sessions are gone with it", sid, url, exc)
                return 0
            if resp.status_code != 200:
                return 0  # already unloaded
            return int(resp.json().get("sessions", 0))

        return sum(await asyncio.gather(*(count(s.url, s.stage_id) for s in stages)))
