"""The monitor service: node registry, heartbeats, calibrations, link estimates, change events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from edgeorch.monitoring.cluster import ClusterState, EventDraft, Thresholds
from edgeorch.schemas.monitor import (
    Heartbeat,
    HeartbeatReply,
    MonitorEvent,
    Peer,
    ProfileReport,
    Registration,
)
from edgeorch.service import bus
from edgeorch.service.http_app import base_app
from edgeorch.service.limits import DEFAULT_MAX_BODY_BYTES
from edgeorch.service.settings import ServiceSettings
from edgeorch.service.storage import default_database_url, make_engine
from services.monitor.fast_path import HeartbeatFastPath
from services.monitor.metrics import MonitorMetrics
from services.monitor.routes import router
from services.monitor.store import Base, MonitorStore

log = logging.getLogger(__name__)


class MonitorSettings(ServiceSettings):
    """Monitor knobs (EDGEORCH_* environment variables)."""

    lost_after_s: float = Field(default=2.0, gt=0, description="silence after which a node is lost")
    speed_change: float = Field(default=0.3, gt=0, description="relative speed change worth an event")
    bandwidth_change: float = Field(default=0.3, gt=0, description="relative bandwidth change worth an event")
    rtt_change: float = Field(default=0.5, gt=0, description="relative RTT change worth an event")
    live_ttl_s: int = Field(default=5, ge=1, description="expiry of live state in Redis")
    max_peers: int = Field(
        default=16, ge=1, description="peers each node probes at most (its successors on a hash ring)"
    )


class Monitor:
    """Cluster state plus its durable record and its notifications."""

    def __init__(
        self, settings: MonitorSettings, store: MonitorStore, publisher: bus.ResilientPublisher, metrics
    ):
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.metrics = metrics
        self.cluster = ClusterState(Thresholds(
            settings.lost_after_s, settings.speed_change, settings.bandwidth_change, settings.rtt_change,
            late_after_s=0.75 * settings.lost_after_s,
        ))  # fmt: skip
        self.profile_models: list[str] = []
        # Per node: (what its reply depends on, the reply's JSON). A reply changes only when the
        # live set, the models to profile or the node's own profiles do: at 1,000 nodes building
        # and validating 16 peers per heartbeat was a good part of the monitor's CPU.
        self._replies: dict[str, tuple[tuple, bytes]] = {}
        # Nodes whose live state changed since the sweep last wrote it to Redis (one pipeline
        # per sweep instead of a round trip per heartbeat).
        self._dirty: set[str] = set()
        # What heartbeats found, written and published by the next sweep in one transaction each
        # (at most 0.25 s later): a wave of 1,000 calibrations or returns used to be 2,000 SQL
        # transactions, one per heartbeat, and delayed the heartbeats behind them.
        self._queued_events: list[EventDraft] = []
        self._queued_profiles: list[tuple[str, ProfileReport, float]] = []

    async def restore(self) -> None:
        """Reload registrations and calibrations after a restart."""
        now = time.time()
        for reg, registered_at in await run_in_threadpool(self.store.nodes):
            self.cluster.restore(reg, registered_at, now)
        for node_id, report in await run_in_threadpool(self.store.profiles):
            if node_id in self.cluster.nodes:
                self.cluster.nodes[node_id].profiles[report.model] = report
        self.profile_models = await run_in_threadpool(self.store.profile_models)
        log.info("restored %d nodes, profiling %s", len(self.cluster.nodes), self.profile_models)

    async def emit(self, drafts: list[EventDraft]) -> list[MonitorEvent]:
        """Persist, count and publish events."""
        if not drafts:
            return []
        events = await run_in_threadpool(self.store.add_events, drafts, time.time())
        for e in events:
            log.info("event %s node=%s %s", e.kind, e.node_id, json.dumps(e.data, default=str))
            self.metrics.events.labels(e.kind).inc()
            await self.publisher.publish(bus.MONITOR_EVENTS, e.model_dump())
        return events

    async def register(self, reg: Registration) -> None:
        """A worker announced itself."""
        now = time.time()
        drafts = self.cluster.register(reg, now)
        await run_in_threadpool(self.store.save_node, reg, self.cluster.nodes[reg.node_id].registered_at)
        await self.emit(drafts)

    async def heartbeat(self, node_id: str, hb: Heartbeat) -> bytes:
        """Apply a heartbeat (raises UnknownNode); the reply (a HeartbeatReply's JSON) says whom to
        probe and what to calibrate."""
        now = time.time()
        drafts = self.cluster.heartbeat(node_id, hb, now)
        self.metrics.heartbeats.inc()
        self._queued_profiles.extend((node_id, report, now) for report in hb.profiles)
        self._queued_events.extend(drafts)
        self._dirty.add(node_id)
        return self.reply(node_id)

    async def flush_queued(self, more: list[EventDraft] = ()) -> None:
        """Store the calibrations and emit the events heartbeats queued, then ``more`` (the
        sweep's); what fails to be written stays queued for the next sweep."""
        profiles, self._queued_profiles = self._queued_profiles, []
        drafts, self._queued_events = [*self._queued_events, *more], []
        try:
            if profiles:
                await run_in_threadpool(self.store.save_profiles, profiles)
        except Exception:
            self._queued_profiles[:0] = profiles
            self._queued_events[:0] = drafts
            raise
        try:
            await self.emit(drafts)
        except Exception:
            self._queued_events[:0] = drafts
            raise

    def reply(self, node_id: str) -> bytes:
        """The heartbeat reply's JSON for ``node_id``, rebuilt only when something it lists changed."""
        rec = self.cluster.nodes[node_id]
        key = (self.cluster.ring_version, tuple(self.profile_models), tuple(sorted(rec.profiles)))
        cached = self._replies.get(node_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        reply = (
            HeartbeatReply(
                peers=[
                    Peer(node_id=n, url=u) for n, u in self.cluster.peers_of(node_id, self.settings.max_peers)
                ],
                profile_models=self.profile_models,
                profiled_models=sorted(rec.profiles),
            )
            .model_dump_json()
            .encode()
        )
        self._replies[node_id] = (key, reply)
        return reply

    async def write_live(self) -> None:
        """Live state of the nodes that beat since the last call, to Redis in one pipeline, with an
        expiry; skipped (not fatal, they stay due) while Redis is away."""
        if not self._dirty or (not self.publisher.connected and not await self.publisher.flush()):
            return
        due, self._dirty = self._dirty, set()
        try:
            async with self.publisher.client.pipeline(transaction=False) as pipe:
                for node_id in due:
                    rec = self.cluster.nodes.get(node_id)
                    if rec is not None:
                        view = self.cluster.node_view(rec)
                        pipe.set(
                            bus.live_key("node", node_id), view.model_dump_json(), ex=self.settings.live_ttl_s
                        )
                await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - Redis down must not fail the sweep
            log.debug("live state write failed: %r", exc)
            self._dirty |= due
            self.publisher.connected = False

    async def request_profile(self, model: str) -> None:
        """Have every node (and every node that joins later) calibrate ``model``."""
        await run_in_threadpool(self.store.add_profile_model, model, time.time())
        if model not in self.profile_models:
            self.profile_models.append(model)

    async def sweep_forever(self, every_s: float = 0.25) -> None:
        """Mark silent nodes lost; retry queued notifications."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.flush_queued(self.cluster.sweep(time.time()))
                await self.write_live()
                self.metrics.nodes_alive.set(sum(r.state == "alive" for r in self.cluster.nodes.values()))
                if not self.publisher.connected:
                    await self.publisher.flush()
            except Exception:  # noqa: BLE001 - the sweep must outlive any single failure
                log.exception("monitor sweep failed")


def create_app(settings: MonitorSettings) -> FastAPI:
    """Build the monitor app; the database and Redis connections open in its lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        url = settings.database_url or default_database_url("monitor", settings.state_dir)
        engine, sessions = make_engine(url, Base)
        publisher = bus.ResilientPublisher(settings.redis_url)
        monitor = Monitor(settings, MonitorStore(sessions), publisher, metrics)
        await monitor.restore()
        app.state.monitor = monitor
        sweeper = asyncio.create_task(monitor.sweep_forever())
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await publisher.close()
            engine.dispose()

    async def ready() -> dict[str, str]:
        monitor = getattr(app.state, "monitor", None)
        if monitor is None:
            return {"state": "starting"}
        return {} if await monitor.publisher.ping() else {"redis": f"unreachable at {settings.redis_url}"}

    app, registry = base_app(
        "monitor",
        description="Monitoring & Capacity Profiling: nodes, calibrated speeds, links, change events.",
        ready_check=ready,
        lifespan=lifespan,
        trim_heap=True,
    )
    app.state.admin_token = settings.admin_token
    metrics = MonitorMetrics(registry)
    app.include_router(router)
    # Outside the body limit and the routing (inside only Starlette's error middleware): a heartbeat
    # skips FastAPI's layers (services/monitor/fast_path.py).
    app.add_middleware(
        HeartbeatFastPath,
        monitor=lambda: getattr(app.state, "monitor", None),
        max_bytes=DEFAULT_MAX_BODY_BYTES,
    )
    return app
