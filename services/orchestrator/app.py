"""The orchestrator: deployments, the adaptive control loop, the OpenAI-compatible gateway.

Thin glue: the decisions live in :mod:`edgeorch.orchestration` (snapshot,
decide, generation) and in ``controller.py``; this module builds the pieces
in the app's lifespan, restores deployments from SQL, and listens to the
monitor's events on Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from edgeorch.models.store import ModelStore
from edgeorch.orchestration.batched_steps import StepBatcher
from edgeorch.orchestration.clients import ControlPlane
from edgeorch.orchestration.spotcheck import DEFAULT_SHARE, DEFAULT_TOLERANCE, Shadows, SpotChecker
from edgeorch.security.certs import client_verify
from edgeorch.service import bus
from edgeorch.service.auth import admin_headers
from edgeorch.service.http_app import base_app
from edgeorch.service.settings import ServiceSettings
from edgeorch.service.storage import default_database_url, make_engine
from edgeorch.transport.hopclient import HopClient
from services.orchestrator.controller import Controller
from services.orchestrator.dashboard_routes import router as dashboard_router
from services.orchestrator.deployments import DeploymentBook
from services.orchestrator.gateway_auth import rate_limiter
from services.orchestrator.metrics import OrchestratorMetrics
from services.orchestrator.openai_errors import GatewayError, gateway_error_response
from services.orchestrator.openai_routes import router as openai_router
from services.orchestrator.routes import router
from services.orchestrator.store import Base, OrchestratorStore

log = logging.getLogger(__name__)


class OrchestratorSettings(ServiceSettings):
    """Orchestrator knobs (EDGEORCH_* environment variables)."""

    monitor_url: str = Field(default="http://127.0.0.1:8001", description="the monitor service")
    splitter_url: str = Field(default="http://127.0.0.1:8002", description="the splitter service")
    broadcast_url: str = Field(default="http://127.0.0.1:8003", description="the broadcast service")
    public_url: str | None = Field(default=None, description="how jobs reach this gateway; default: bind")
    replan_interval_s: float = Field(default=5.0, gt=0, description="re-evaluate every plan this often")
    debounce_s: float = Field(default=0.2, ge=0, description="wait for a burst of events to end")
    confirm_s: float = Field(
        default=3.0,
        ge=0,
        description="a change not confirmed by measured steps must be predicted to pay off on every look "
        "for this long",
    )
    confirm_slowdown: float = Field(
        default=1.5,
        ge=0,
        description="the current plan's decode steps this many times their earlier median confirm a "
        "predicted gain at once, without waiting confirm_s; 0: never",
    )
    rollout_wait_s: float = Field(default=60.0, gt=0, description="give up on a rollout after this")
    plan_time_limit_s: float = Field(
        default=0.1,
        gt=0,
        le=60,
        description="the splitter's search time per look (answers may be near-optimal)",
    )
    min_eval_interval_s: float = Field(
        default=1.0,
        ge=0,
        description="least time between two looks of a deployment's loop (recoveries excepted)",
    )
    request_timeout_s: float = Field(default=120.0, gt=0, description="one chain step at most")
    max_tokens_limit: int = Field(default=2048, ge=1, description="largest max_tokens accepted")
    rate_limit_per_s: float = Field(
        default=0.0, ge=0, allow_inf_nan=False,
        description="gateway requests per second per API key, after a burst; 0: no limit",
    )  # fmt: skip
    rate_limit_burst: int = Field(default=20, ge=1, description="requests an idle API key may send at once")
    rollout_secret: str = Field(
        default="", description="the broadcast service's shared secret: the stages' data-plane credentials "
        "derive from it (empty: the loopback development secret, as on the workers)",
    )  # fmt: skip
    max_sessions: int = Field(
        default=16, ge=1, description="sessions one deployment generates at once (the workers' batch)"
    )
    max_waiting_sessions: int = Field(
        default=64, ge=0, description="sessions that may wait for a slot; past that a request gets 429"
    )
    hop_batch_rows: int = Field(
        default=16, ge=0, le=64, description="concurrent sessions' decode steps sent as one frame per hop, "
        "up to this many (edgeorch/orchestration/batched_steps.py); 0 or 1: every step alone",
    )  # fmt: skip
    hop_batches_in_flight: int = Field(
        default=1, ge=1, le=16, description="multi-session frames one entry stage may have in flight at once "
        "(more than 1: the sessions split into groups that pipeline through the stages)",
    )  # fmt: skip
    hop_batch_window_s: float = Field(
        default=0.005, ge=0, le=1, allow_inf_nan=False,
        description="longest a gathered batch waits for a running session's next step",
    )  # fmt: skip
    spot_check_share: float = Field(
        default=DEFAULT_SHARE, ge=0, le=1, allow_inf_nan=False,
        description="share of the steps on routes with untrusted nodes that a trusted node recomputes "
        "(edgeorch/orchestration/spotcheck.py); 0: no spot checks",
    )  # fmt: skip
    spot_check_hold_s: float = Field(
        default=0.0, ge=0, le=60, allow_inf_nan=False,
        description="hold a whole answer from a route with untrusted nodes until they pass a check begun "
        "after its last step; after this many seconds without one, check the answer's last step itself; "
        "0: do not hold (an answer finished just before its node is found out is given out)",
    )  # fmt: skip
    spot_check_tolerance: float = Field(
        default=DEFAULT_TOLERANCE, ge=0, allow_inf_nan=False,
        description="nats a lossy route's log-probabilities may differ from the trusted node's (fp32: exact)",
    )  # fmt: skip


async def _follow_monitor(settings: OrchestratorSettings, controller: Controller) -> None:
    """Wake the control loops on every monitor event; reconnect with backoff when Redis is away."""
    import redis.asyncio as aioredis

    backoff = 0.5
    while True:
        client = aioredis.from_url(settings.redis_url, socket_connect_timeout=2.0)
        try:
            async with client.pubsub() as ps:
                await ps.subscribe(bus.MONITOR_EVENTS)
                backoff = 0.5
                async for msg in ps.listen():
                    if msg.get("type") != "message":
                        continue
                    event = json.loads(msg["data"])
                    if event.get("kind") in ("node_joined", "node_returned") and event.get("node_id"):
                        controller.node_seen(event["node_id"])
                    if event.get("kind") != "profiled" or event.get("node_id"):
                        controller.poke_all(
                            f"monitor: {event.get('kind')} {event.get('node_id') or ''}".strip()
                        )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - Redis away: the timer still re-plans
            log.warning("monitor events unavailable (%r); retrying in %.1fs", exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()


def create_app(settings: OrchestratorSettings, bind_url: str | None = None) -> FastAPI:
    """Build the orchestrator app; connections and loops start in its lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        url = settings.database_url or default_database_url("orchestrator", settings.state_dir)
        engine, sessions = make_engine(url, Base)
        store = OrchestratorStore(sessions)
        publisher = bus.ResilientPublisher(settings.redis_url)
        plane = ControlPlane(settings.monitor_url, settings.splitter_url, settings.broadcast_url,
                             settings.admin_token)  # fmt: skip
        controller = Controller(store, plane, settings, metrics, publisher)
        book = DeploymentBook(
            store, controller, ModelStore(settings.model_store, settings.allowed_model_dirs())
        )
        app.state.store, app.state.controller, app.state.book = store, controller, book
        app.state.routes = controller.routes  # the gateway's route provider
        # The data plane's own client: the entry hop is paid on every token (docs/design.md, the hop transport).
        app.state.data_http = HopClient(timeout_s=settings.request_timeout_s, max_idle_per_peer=64)
        app.state.step_batcher = (
            StepBatcher(app.state.data_http, settings.hop_batch_rows, settings.hop_batches_in_flight,
                        settings.hop_batch_window_s)
            if settings.hop_batch_rows > 1 else None
        )  # fmt: skip
        app.state.gateway_url = settings.public_url or bind_url or "http://127.0.0.1:8000"
        shadows_http = httpx.AsyncClient(timeout=300.0, headers=admin_headers(settings.admin_token),
                                         verify=client_verify())  # fmt: skip
        if settings.spot_check_share > 0:
            shadows = Shadows(shadows_http, plane.nodes)
            controller.routes.checker = SpotChecker(
                app.state.data_http, shadows, controller.routes.blame,
                share=settings.spot_check_share, tolerance=settings.spot_check_tolerance,
                settle_max_s=settings.spot_check_hold_s,
            )  # fmt: skip
        await book.restore()
        follower = asyncio.create_task(_follow_monitor(settings, controller))
        try:
            yield
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            await controller.stop()
            if controller.routes.checker is not None:
                await controller.routes.checker.aclose()
            await shadows_http.aclose()
            await app.state.data_http.aclose()
            await plane.close()
            await publisher.close()
            engine.dispose()

    async def ready() -> dict[str, str]:
        store = getattr(app.state, "store", None)
        if store is None:
            return {"state": "starting"}
        problems = {}
        try:
            await run_in_threadpool(store.ping)
        except Exception as exc:  # noqa: BLE001 - any driver error means "not ready"
            problems["database"] = repr(exc)
        if not await app.state.controller.publisher.ping():
            problems["redis"] = f"unreachable at {settings.redis_url}"
        return problems

    app, registry = base_app(
        "orchestrator",
        description="Adaptive Orchestrator: deployments, the control loop, an OpenAI-compatible gateway.",
        ready_check=ready,
        lifespan=lifespan,
        trim_heap=True,
    )
    metrics = OrchestratorMetrics(registry)
    app.state.settings = settings
    app.state.admissions = {}  # deployment -> Admission (openai_routes.py), made on first use
    app.state.metrics = metrics
    app.state.admin_token = settings.admin_token
    app.state.rate_limiter = rate_limiter(settings)
    app.include_router(dashboard_router)  # the page at / and its reads (its own lifespan)
    app.include_router(router)
    app.include_router(openai_router)
    app.add_exception_handler(GatewayError, gateway_error_response)
    with contextlib.suppress(ImportError):  # the jobs API comes with Celery's app
        from services.orchestrator.jobs_routes import jobs_router

        app.include_router(jobs_router())
    return app
