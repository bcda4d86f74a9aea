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
from edgeorch.schemas.monitor import Heartbeat, HeartbeatReply, MonitorEvent, Peer, Registration
from edgeorch.service import bus
from edgeorch.service.http_app import base_app
from edgeorch.service.settings import ServiceSettings
from edgeorch.service.storage import default_database_url, make_engine
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
        ))  # fmt: skip
        self.profile_models: list[str] = []

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

    async def heartbeat(self, node_id: str, hb: Heartbeat) -> HeartbeatReply:
        """Apply a heartbeat (raises UnknownNode); tell the worker whom to probe and what to calibrate."""
        now = time.time()
        drafts = self.cluster.heartbeat(node_id, hb, now)
        self.metrics.heartbeats.inc()
        for report in hb.profiles:
            await run_in_threadpool(self.store.save_profile, node_id, report, now)
        await self.emit(drafts)
        await self._write_live(node_id)
        rec = self.cluster.nodes[node_id]
        return HeartbeatReply(
            peers=[
                Peer(node_id=n, url=u) for n, u in self.cluster.peers_of(node_id, self.settings.max_peers)
            ],
            profile_models=self.profile_models,
            profiled_models=sorted(rec.profiles),
        )

    async def _write_live(self, node_id: str) -> None:
        """Live state in Redis with an expiry; skipped (not fatal) while Redis is away."""
        if not self.publisher.connected and not await self.publisher.flush():
            return
        view = self.cluster.node_view(self.cluster.nodes[node_id])
        try:
            await self.publisher.client.set(bus.live_key("node", node_id), view.model_dump_json(),
                                            ex=self.settings.live_ttl_s)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - Redis down must not fail a heartbeat
            log.debug("live state write failed: %r", exc)
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
                await self.emit(self.cluster.sweep(time.time()))
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
    )
    app.state.admin_token = settings.admin_token
    metrics = MonitorMetrics(registry)
    app.include_router(router)
    return app
