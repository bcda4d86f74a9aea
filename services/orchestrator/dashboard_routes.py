"""The dashboard: the page at ``/`` and the few reads and admin forwards it needs beyond the REST API.

The page (``static/``: HTML, CSS, JavaScript modules, no build step, nothing
from a CDN) reads ``/v1/deployments``, ``/v1/models`` and the routes here:
``/v1/cluster`` (the monitor's nodes and links with what the orchestrator
knows of them), ``/v1/series`` (gateway figures over the last minutes),
``/v1/events/stream`` (the decision log as SSE) and ``/v1/rollouts/{id}``
(a rollout's phases, from broadcast). ``POST /v1/nodes/{id}/emulation``
forwards an admin's emulation change to the node's worker, which may live on
another host than the browser can reach. The logic lives in
:mod:`edgeorch.dashboard`; the app's state (store, controller, book, metrics,
settings) is read from ``app.state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import httpx
from fastapi import APIRouter, FastAPI, Header, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from edgeorch.dashboard.cluster import Placement, cluster_view, unit_memory_bytes
from edgeorch.dashboard.feed import Pulse, event_stream
from edgeorch.dashboard.series import SeriesRecorder, read_counters
from edgeorch.schemas.dashboard import ClusterView, SeriesView
from edgeorch.schemas.rollout import DEPLOYMENT_PATTERN
from edgeorch.schemas.stage import ID_PATTERN, Emulation
from edgeorch.security.certs import client_verify
from edgeorch.service import bus
from edgeorch.service.auth import AdminAuth, admin_headers
from edgeorch.service.limits import MAX_SQL_INT

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
# Every file the page loads, by name: nothing else under static/ (or above it) is served.
ASSETS = {
    "dashboard.css": "text/css",
    "dashboard.js": "text/javascript",
    "cluster.js": "text/javascript",
    "charts.js": "text/javascript",
    "chat.js": "text/javascript",
    "admin.js": "text/javascript",
    "util.js": "text/javascript",
}
# The page runs only its own files and talks only to this origin.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
SAMPLE_S, WINDOW_S, KEEP_S = 2.0, 10.0, 600.0  # the live series: a point every 2 s over 10 s, 10 minutes
TAIL_EVENTS = 200  # events a new page starts with
WORKER_TIMEOUT_S = 1.0  # a worker that does not say its emulation within this is shown without it


class DashboardState:
    """What the dashboard keeps per app: the series, the event pulse, a client for the other services."""

    def __init__(self, admin_token: str):
        self.recorder = SeriesRecorder(SAMPLE_S, WINDOW_S, KEEP_S)
        self.pulse = Pulse()
        self.http = httpx.AsyncClient(timeout=5.0, headers=admin_headers(admin_token), verify=client_verify())


async def _sample(state: DashboardState, metrics) -> None:
    """Snapshot the gateway's counters every SAMPLE_S."""
    while True:
        try:
            state.recorder.record(time.time(), read_counters(metrics))
        except Exception:  # noqa: BLE001 - a bad sample (clock stepped back) must not end the series
            log.exception("dashboard: sampling the gateway counters failed")
        await asyncio.sleep(SAMPLE_S)


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Start the sampler and the event follower; runs inside the orchestrator's own lifespan."""
    settings = app.state.settings
    state = DashboardState(settings.admin_token)
    app.state.dashboard = state
    tasks = [
        asyncio.create_task(_sample(state, app.state.metrics), name="dashboard-sampler"),
        # Each event beats the pulse; while Redis is away the streams fall back to polling.
        asyncio.create_task(
            bus.follow(
                settings.redis_url,
                bus.ORCHESTRATOR_EVENTS,
                lambda _data: state.pulse.beat(),
                max_backoff_s=10.0,
            ),
            name="dashboard-events",
        ),  # fmt: skip
    ]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await state.http.aclose()


router = APIRouter(lifespan=lifespan)
NodeId = Annotated[str, PathParam(pattern=ID_PATTERN)]


# ----- the page -------------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    """The dashboard."""
    return FileResponse(STATIC / "index.html", media_type="text/html",
                        headers={"content-security-policy": CSP, "cache-control": "no-cache"})  # fmt: skip


@router.get("/dashboard/{name}", include_in_schema=False)
async def asset(name: str) -> FileResponse:
    """One of the page's own files."""
    if name not in ASSETS:
        raise HTTPException(404, f"no dashboard file {name!r}")
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers={"cache-control": "no-cache"})


# ----- reads ----------------------------------------------------------------------------------


async def _get(state: DashboardState, service: str, url: str, timeout_s: float = 5.0, **kw):
    """GET a JSON answer from another service, or a 502 that names it."""
    try:
        resp = await state.http.get(url, timeout=timeout_s, **kw)
    except httpx.HTTPError as exc:
        raise HTTPException(502, f"{service} unreachable at {url}: {exc!r}") from exc
    if resp.status_code == 404:
        raise HTTPException(404, f"{service}: {resp.json().get('detail', resp.text)}")
    if resp.status_code >= 400:
        raise HTTPException(502, f"{service} answered {resp.status_code}: {resp.text[:300]}")
    return resp.json()


async def _emulation(state: DashboardState, url: str) -> Emulation | None:
    try:
        resp = await state.http.get(f"{url.rstrip('/')}/v1/admin/emulation", timeout=WORKER_TIMEOUT_S)
        return Emulation.model_validate(resp.json()) if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError):  # pydantic's ValidationError is a ValueError
        return None


async def _placements(request: Request) -> list[Placement]:
    """Every deployment's active plan with the memory of each unit under its policy's workload."""
    app = request.app
    out = []
    for name, live in list(app.state.controller.live.items()):
        active = await run_in_threadpool(_active_plan, app.state.store, name)
        if active is None:
            continue
        w = live.policy.workload
        out.append(Placement(name, active.version, active.stages,
                             unit_memory_bytes(live.profile, w.context_tokens, w.max_sessions)))  # fmt: skip
    return out


def _active_plan(store, name: str):
    try:
        return store.active_plan(name)
    except LookupError:  # deleted meanwhile
        return None


@router.get("/v1/cluster", response_model=ClusterView, tags=["dashboard"])
async def cluster(request: Request) -> ClusterView:
    """Every node (ready, suspect, lost; speed against calibration; memory; trust; watts) and link."""
    app = request.app
    state: DashboardState = app.state.dashboard
    monitor = app.state.settings.monitor_url.rstrip("/")
    nodes, links = await asyncio.gather(
        _get(state, "monitor", f"{monitor}/v1/nodes"), _get(state, "monitor", f"{monitor}/v1/links")
    )
    alive = [n for n in nodes if n.get("state") == "alive"]
    emulations = await asyncio.gather(*(_emulation(state, n["url"]) for n in alive))
    suspects = sorted(app.state.routes.excluded(frozenset()))  # recent ones only
    models = await run_in_threadpool(app.state.book.models.prepared)
    return cluster_view(nodes, links, now=time.time(), suspects=suspects,
                        placements=await _placements(request),
                        emulations={n["node_id"]: e for n, e in zip(alive, emulations, strict=True)},
                        models=models)  # fmt: skip


@router.get("/v1/series", response_model=SeriesView, tags=["dashboard"])
async def series(request: Request, last_s: Annotated[float, Query(gt=0, le=KEEP_S)] = 300.0) -> SeriesView:
    """Per deployment: requests, tokens/s, mean request latency and decode step over the last minutes."""
    return request.app.state.dashboard.recorder.view(last_s)


@router.get("/v1/events/stream", tags=["events"], response_class=StreamingResponse)
async def stream_events(
    request: Request,
    since: Annotated[int | None, Query(ge=0, le=MAX_SQL_INT, description="events after this id")] = None,
    tail: Annotated[int, Query(ge=0, le=10_000, description="without since: the last N events first")] = 0,
    deployment: Annotated[str | None, Query(pattern=DEPLOYMENT_PATTERN)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """The decision log as Server-Sent Events, live; a reconnecting EventSource resumes where it was."""
    store = request.app.state.store
    if last_event_id and last_event_id.isdigit() and len(last_event_id) <= 18:  # fits a 64-bit id
        start = int(last_event_id)
    elif since is not None:
        start = since
    else:
        start = max(0, await run_in_threadpool(store.last_event_id) - tail)

    async def read(after: int):
        return await run_in_threadpool(store.events, after, deployment, 500)

    frames = event_stream(read, request.app.state.dashboard.pulse, start)
    return StreamingResponse(frames, media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})  # fmt: skip


@router.get("/v1/rollouts/{rollout_id}", tags=["dashboard"])
async def rollout(rollout_id: Annotated[str, PathParam(pattern=ID_PATTERN)], request: Request) -> dict:
    """A rollout's phases (PREPARE acks, COMMIT, RELEASE) as broadcast recorded them."""
    broadcast = request.app.state.settings.broadcast_url.rstrip("/")
    return await _get(request.app.state.dashboard, "broadcast", f"{broadcast}/v1/rollouts/{rollout_id}")


# ----- admin ----------------------------------------------------------------------------------


@router.post("/v1/nodes/{node_id}/emulation", response_model=Emulation, tags=["dashboard"],
             dependencies=[AdminAuth])  # fmt: skip
async def set_emulation(node_id: NodeId, emulation: Emulation, request: Request) -> Emulation:
    """Set a worker's emulated capacity (slowdown, bandwidth, RTT) through the orchestrator."""
    state: DashboardState = request.app.state.dashboard
    monitor = request.app.state.settings.monitor_url.rstrip("/")
    node = await _get(state, "monitor", f"{monitor}/v1/nodes/{node_id}")
    if node.get("state") != "alive":
        raise HTTPException(409, f"node {node_id!r} is {node.get('state')}; its worker cannot be reached")
    url = f"{node['url'].rstrip('/')}/v1/admin/emulation"
    try:
        resp = await state.http.post(url, json=emulation.model_dump())
    except httpx.HTTPError as exc:
        raise HTTPException(502, f"worker {node_id} unreachable at {url}: {exc!r}") from exc
    if resp.status_code != 200:
        raise HTTPException(502, f"worker {node_id} answered {resp.status_code}: {resp.text[:300]}")
    log.info("emulation of %s set to %s", node_id, emulation.model_dump_json())
    return Emulation.model_validate(resp.json())
