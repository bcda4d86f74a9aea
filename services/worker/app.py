"""The worker service: serves model stages and forwards activations down the chain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from contextlib import asynccontextmanager

import psutil
from fastapi import FastAPI
from pydantic import Field

from edgeorch.engine import import_engine
from edgeorch.models.store import ModelStore
from edgeorch.rollout.signing import resolve_secret
from edgeorch.runtime.agent import AgentConfig, MonitorAgent
from edgeorch.runtime.host import StageHost
from edgeorch.runtime.metrics import WorkerMetrics
from edgeorch.runtime.rollout_agent import RolloutAgent, RolloutAgentConfig
from edgeorch.runtime.sessions import SessionStore
from edgeorch.schemas.monitor import NodeCapacity
from edgeorch.schemas.stage import Emulation
from edgeorch.service.http_app import base_app
from edgeorch.service.settings import CommonSettings
from services.worker.kv_routes import router as kv_router
from services.worker.probe_routes import router as probe_router
from services.worker.routes import FAST_FORWARD_ROUTE, router

log = logging.getLogger(__name__)


class WorkerSettings(CommonSettings):
    """Worker knobs (EDGEORCH_* environment variables)."""

    node_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    advertise_url: str | None = Field(
        default=None, description="how peers and the control plane reach this worker (set by the launcher)"
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0", description="Redis for control-plane notifications"
    )
    torch_threads: int = Field(default=0, ge=0, description="torch intra-op threads; 0 keeps torch's default")
    standby_units: bool = Field(
        default=False, description="keep every packed unit of the served models mapped and warm, so taking "
        "over a lost worker's units reads nothing (edgeorch.runtime.standby)",
    )  # fmt: skip
    kv_cache_max_bytes: int = Field(
        default=1 << 30, gt=0, description="cap on all session KV caches together"
    )
    session_ttl_s: float = Field(default=300.0, gt=0, description="a session unused this long is dropped")
    max_frame_bytes: int = Field(default=64 << 20, gt=0, description="largest forward body accepted")
    kv_max_frame_bytes: int = Field(default=1 << 30, gt=0, description="largest KV slice a pull accepts")
    forward_timeout_s: float = Field(default=120.0, gt=0, description="how long to wait for the next stage")
    inline_max_tokens: int = Field(
        default=8, ge=0,
        description="steps of at most this many tokens compute on the event loop while nothing else "
        "is in flight (saves two thread wake-ups per stage); 0: always on the compute thread",
    )  # fmt: skip
    max_batch: int = Field(
        default=16, ge=1, le=256,
        description="decode steps of concurrent sessions run as one forward, up to this many; 1: no batching",
    )  # fmt: skip
    batch_row_block: int = Field(
        default=1, ge=1, le=64,
        description="decode steps (alone or batched) run over a multiple of this many rows, zero-padded, so "
        "a session's result does not depend on its batch (4 for MKL's fp32 kernels; costs the solo step); "
        "1: no padding",
    )  # fmt: skip
    emulation_slowdown: float = Field(default=1.0, ge=1.0)
    emulation_bandwidth_mbps: float | None = Field(default=None, gt=0)
    emulation_rtt_ms: float = Field(default=0.0, ge=0)
    # Monitoring: the agent runs only when monitor_url is set.
    monitor_url: str | None = Field(default=None, description="the monitor service; unset: no agent")
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    speed_probe_interval_s: float = Field(default=0.25, gt=0)
    link_probe_interval_s: float = Field(default=0.5, gt=0)
    cores: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, description="static capacity")
    memory_bytes: int = Field(default_factory=lambda: psutil.virtual_memory().total, ge=0)
    memory: int | None = Field(
        default=None, gt=0,
        description="memory cap in bytes (EDGEORCH_MEMORY, --memory): a stage load whose weights + planned "
        "KV would pass it is refused; also the memory this node advertises",
    )  # fmt: skip
    device: str = "cpu"
    trusted: bool = False
    watts: float = Field(default=10.0, ge=0)
    # Reconfiguration Broadcast: the rollout agent runs only when broadcast_url is set.
    broadcast_url: str | None = Field(
        default=None, description="the broadcast service; unset: no rollout agent"
    )
    rollout_secret: str = Field(
        default="", description="shared HMAC secret, the same as the broadcast service's"
    )
    rollout_pull_interval_s: float = Field(default=5.0, gt=0, description="desired-state pull period")
    rollout_max_age_s: float = Field(default=300.0, gt=0, description="older rollout messages are refused")


async def _sweep_sessions(host: StageHost, every_s: float) -> None:
    """Drop expired sessions now and then, even when no traffic arrives."""
    while True:
        await asyncio.sleep(every_s)
        try:
            dropped = host.sessions.evict_expired()
            if dropped:
                log.info("dropped %d expired sessions", dropped)
            host.metrics.kv_bytes.set(host.sessions.total_bytes())
            host.metrics.sessions.set(host.sessions.count())
        except Exception:  # a sweep must never kill the worker
            log.exception("session sweep failed")


def create_app(settings: WorkerSettings) -> FastAPI:
    """Build a worker app; nothing is loaded until a stage is PUT (the engine's code is imported at start)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # On a thread: a loaded machine takes tens of seconds over these imports, and /healthz
        # must answer meanwhile (a first stage load waits for them on Python's import lock).
        threading.Thread(target=_import_engine, args=(host, app.state.engine_imported), daemon=True,
                         name="engine-import").start()  # fmt: skip
        await host.start()
        sweeper = asyncio.create_task(_sweep_sessions(host, min(5.0, settings.session_ttl_s / 2)))
        agent = _make_agent(host, settings)
        app.state.agent = agent
        if agent is not None:
            await agent.start()
        rollout_agent = _make_rollout_agent(host, settings, registry)
        app.state.rollout_agent = rollout_agent
        if rollout_agent is not None:
            await rollout_agent.start()
        try:
            yield
        finally:
            if rollout_agent is not None:
                await rollout_agent.stop()
            if agent is not None:
                await agent.stop()
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await host.close()

    app, registry = base_app(
        "worker",
        description="Runs contiguous unit ranges of a model and forwards activations to the next stage.",
        lifespan=lifespan,
        # The forward route refuses a frame over max_frame_bytes itself, with the protocol's fields.
        max_body_bytes=settings.max_frame_bytes + (1 << 20),
    )
    host = StageHost(
        store=ModelStore(settings.model_store, settings.allowed_model_dirs()),
        sessions=SessionStore(settings.kv_cache_max_bytes, settings.session_ttl_s),
        metrics=WorkerMetrics(registry),
        node_id=settings.node_id,
        forward_timeout_s=settings.forward_timeout_s,
        inline_max_tokens=settings.inline_max_tokens,
        max_batch=settings.max_batch,
        row_block=settings.batch_row_block,
        memory_limit=settings.memory,
        emulation=Emulation(
            slowdown=settings.emulation_slowdown,
            bandwidth_mbps=settings.emulation_bandwidth_mbps,
            rtt_ms=settings.emulation_rtt_ms,
        ),
    )
    app.state.host = host
    app.state.engine_imported = threading.Event()
    app.state.settings = settings
    app.state.admin_token = settings.admin_token
    app.include_router(router)
    app.include_router(probe_router)
    app.include_router(kv_router)
    # First match wins: the data path skips FastAPI's parameter machinery.
    app.router.routes.insert(0, FAST_FORWARD_ROUTE)
    return app


def _import_engine(host: StageHost, done: threading.Event) -> None:
    """Import the engine's code, then run its kernels once on the host's own threads (engine/warmup.py)."""
    import_engine()
    try:
        seconds = host.warm_engine()
        log.info("engine imported and warmed up in %.2fs", seconds)
    except Exception:  # a warm-up is an optimisation of memory accounting: never a reason not to serve
        log.exception("engine warm-up failed; the first stage will pay its first-use code")
    done.set()


def _make_agent(host: StageHost, settings: WorkerSettings) -> MonitorAgent | None:
    if not settings.monitor_url:
        return None
    if not settings.advertise_url:
        raise ValueError(
            "EDGEORCH_ADVERTISE_URL must be set when EDGEORCH_MONITOR_URL is: peers must reach us"
        )
    capacity = NodeCapacity(
        cores=settings.cores, memory_bytes=settings.memory or settings.memory_bytes, device=settings.device,
        trusted=settings.trusted, watts=settings.watts,
    )  # fmt: skip
    return MonitorAgent(
        host,
        AgentConfig(
            monitor_url=settings.monitor_url.rstrip("/"), node_id=settings.node_id,
            advertise_url=settings.advertise_url, capacity=capacity,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            speed_probe_interval_s=settings.speed_probe_interval_s,
            link_probe_interval_s=settings.link_probe_interval_s,
        ),
    )  # fmt: skip


def _make_rollout_agent(host: StageHost, settings: WorkerSettings, registry) -> RolloutAgent | None:
    if not settings.broadcast_url:
        return None
    cfg = RolloutAgentConfig(
        node_id=settings.node_id, broadcast_url=settings.broadcast_url.rstrip("/"),
        redis_url=settings.redis_url, secret=resolve_secret(settings.rollout_secret),
        pull_interval_s=settings.rollout_pull_interval_s, max_age_s=settings.rollout_max_age_s,
        standby=settings.standby_units,
    )  # fmt: skip
    return RolloutAgent(host, cfg, registry)
