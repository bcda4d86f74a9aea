"""The broadcast service: rolls plan versions out to workers in two phases (DESIGN.md §6.3)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from pydantic import Field

from edgeorch.rollout.signing import resolve_secret
from edgeorch.service.bus import ResilientPublisher
from edgeorch.service.http_app import base_app
from edgeorch.service.settings import ServiceSettings
from edgeorch.service.storage import default_database_url, make_engine
from services.broadcast.driver import DriverConfig, RolloutDriver
from services.broadcast.metrics import BroadcastMetrics
from services.broadcast.routes import refused_answer, router
from services.broadcast.store import Base, Conflict, RolloutStore

log = logging.getLogger(__name__)


class BroadcastSettings(ServiceSettings):
    """Broadcast knobs (EDGEORCH_* environment variables)."""

    rollout_secret: str = Field(
        default="", description="shared HMAC secret for rollout messages, desired states and acks"
    )
    prepare_timeout_s: float = Field(default=120.0, gt=0, description="every worker must ack within this")
    drain_timeout_s: float = Field(
        default=120.0, gt=0, description="release the old version after this at most"
    )
    drain_grace_s: float = Field(
        default=2.0, ge=0, description="keep the old version at least this long after COMMIT"
    )
    probe_interval_s: float = Field(default=1.0, gt=0, description="how often un-acked workers are probed")
    probe_timeout_s: float = Field(default=2.0, gt=0)
    dead_after_failures: int = Field(
        default=3, ge=1, description="failed probes in a row that abort a rollout"
    )
    tick_s: float = Field(default=0.25, gt=0, description="driver loop period")


def create_app(settings: BroadcastSettings, bind_host: str | None = None) -> FastAPI:
    """Build a broadcast app: its tables, its Redis publisher, its driver loop."""
    secret = resolve_secret(settings.rollout_secret, bind_host)
    url = settings.database_url or default_database_url("broadcast", settings.state_dir)
    engine, sessions = make_engine(url, Base)
    store = RolloutStore(sessions)
    publisher = ResilientPublisher(settings.redis_url)

    async def ready_check() -> dict[str, str]:
        problems = {}
        try:
            await asyncio.to_thread(store.ping)
        except Exception as exc:  # any driver error means "not ready", never a 500
            problems["database"] = repr(exc)
        if not await publisher.ping():
            problems["redis"] = f"no answer from {settings.redis_url}"
        return problems

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(driver.run_forever())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, 5.0)  # a driver stuck in I/O must not hold shutdown
            await driver.close()
            await publisher.close()
            engine.dispose()

    app, registry = base_app(
        "broadcast",
        description="Rolls plan versions out to workers: PREPARE, COMMIT, RELEASE, or ABORT.",
        ready_check=ready_check,
        lifespan=lifespan,
        trim_heap=True,
    )
    cfg = DriverConfig(
        secret=secret, drain_timeout_s=settings.drain_timeout_s, drain_grace_s=settings.drain_grace_s,
        probe_interval_s=settings.probe_interval_s, probe_timeout_s=settings.probe_timeout_s,
        dead_after_failures=settings.dead_after_failures, tick_s=settings.tick_s,
    )  # fmt: skip
    driver = RolloutDriver(store, publisher, BroadcastMetrics(registry), cfg)
    app.state.settings = settings
    app.state.admin_token = settings.admin_token
    app.state.secret = secret
    app.state.store = store
    app.state.driver = driver
    app.include_router(router)
    app.add_exception_handler(Conflict, refused_answer)
    return app
