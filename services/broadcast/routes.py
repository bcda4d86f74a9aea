"""Broadcast HTTP routes: start and inspect rollouts, take acks, serve desired state and deployments."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from edgeorch.rollout.signing import SIGNATURE_HEADER, bytes_signature_ok, signed_desired
from edgeorch.schemas.rollout import (
    DEPLOYMENT_PATTERN,
    AckRequest,
    PlacementView,
    RolloutRequest,
    RolloutView,
)
from edgeorch.schemas.stage import ID_PATTERN
from edgeorch.service.auth import AdminAuth
from services.broadcast.driver import RolloutDriver
from services.broadcast.store import Conflict, NotFound, RolloutStore

log = logging.getLogger(__name__)
router = APIRouter()


async def refused_answer(request: Request, exc: Exception) -> JSONResponse:
    """A Conflict raised by any route, as a 409 whose JSON says ``detail`` and ``kind``."""
    return JSONResponse({"detail": str(exc), "kind": getattr(exc, "kind", "conflict")}, 409)


async def get_store(request: Request) -> RolloutStore:
    return request.app.state.store


async def get_driver(request: Request) -> RolloutDriver:
    return request.app.state.driver


Store = Annotated[RolloutStore, Depends(get_store)]
Driver = Annotated[RolloutDriver, Depends(get_driver)]
RolloutId = Annotated[str, Path(pattern=ID_PATTERN)]


# Acks are not guarded by the admin token: workers sign them with the rollout secret.
@router.post(
    "/v1/rollouts", status_code=201, response_model=RolloutView, tags=["rollouts"], dependencies=[AdminAuth]
)
async def start_rollout(req: RolloutRequest, request: Request, store: Store, driver: Driver) -> RolloutView:
    """Start rolling a deployment out to a new plan version: record it, publish PREPARE."""
    settings = request.app.state.settings
    view, superseded = await run_in_threadpool(  # a Conflict answers 409 (refused_answer)
        store.create_rollout, req, uuid.uuid4().hex, time.time(), settings.prepare_timeout_s
    )
    if superseded is not None:
        log.info("rollout %s: RELEASE v%s of %s early, superseded", superseded.id, superseded.from_version,
                 superseded.deployment)  # fmt: skip
        driver.metrics.rollouts.labels("completed").inc()
        await driver.publish("release", superseded)
    driver.metrics.rollouts.labels("started").inc()
    log.info("rollout %s: PREPARE %s v%d (from v%s) on nodes %s", view.id, view.deployment, view.version,
             view.from_version, ", ".join(view.nodes))  # fmt: skip
    await driver.publish("prepare", view)
    driver.poke()
    return view


@router.get("/v1/rollouts", response_model=list[RolloutView], tags=["rollouts"])
async def list_rollouts(
    store: Store,
    deployment: Annotated[str | None, Query(pattern=DEPLOYMENT_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> list[RolloutView]:
    """Recent rollouts, newest first."""
    return await run_in_threadpool(store.list_rollouts, deployment, limit)


@router.get("/v1/rollouts/{rollout_id}", response_model=RolloutView, tags=["rollouts"])
async def get_rollout(rollout_id: RolloutId, store: Store) -> RolloutView:
    """A rollout's phase and every worker's ack."""
    try:
        return await run_in_threadpool(store.get_rollout, rollout_id)
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from exc


@router.post("/v1/rollouts/{rollout_id}/acks", tags=["rollouts"])
async def post_ack(rollout_id: RolloutId, request: Request, store: Store, driver: Driver) -> dict:
    """A worker's PREPARE result; the body must carry the shared-secret HMAC in x-edgeorch-signature."""
    body = await request.body()
    if not bytes_signature_ok(body, request.headers.get(SIGNATURE_HEADER), request.app.state.secret):
        driver.metrics.acks.labels("refused").inc()
        log.warning("refused an ack for rollout %s: missing or bad signature", rollout_id)
        raise HTTPException(401, "ack is unsigned or its signature is wrong")
    try:
        ack = AckRequest.model_validate_json(body)
    except ValidationError as exc:
        raise HTTPException(422, f"ack body: {exc.errors(include_url=False)}") from exc
    if ack.rollout_id != rollout_id:
        raise HTTPException(422, f"ack names rollout {ack.rollout_id!r} but was posted to {rollout_id!r}")
    try:
        view = await run_in_threadpool(store.add_ack, ack, time.time())
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    except Conflict:
        driver.metrics.acks.labels("refused").inc()
        raise
    driver.metrics.acks.labels("ok" if ack.ok else "failed").inc()
    log.info("rollout %s: %s acked %s in %.2fs (%d bytes read)%s", rollout_id, ack.node_id,
             "ok" if ack.ok else "FAILED", ack.prepare_s, ack.bytes_read,
             f": {ack.error}" if ack.error else "")  # fmt: skip
    driver.poke()
    return {"accepted": True, "phase": view.phase}


@router.get("/v1/nodes/{node_id}/desired", tags=["workers"])
async def desired_state(
    node_id: Annotated[str, Path(pattern=ID_PATTERN)], request: Request, store: Store
) -> dict:
    """The stages this node must hold now and any PREPARE it must ack, signed."""
    desired = await run_in_threadpool(store.desired, node_id)
    return signed_desired(node_id, desired, request.app.state.secret)


@router.get("/v1/deployments", response_model=list[PlacementView], tags=["deployments"])
async def list_deployments(store: Store) -> list[PlacementView]:
    """Every deployment with a committed version."""
    return await run_in_threadpool(store.deployments)


@router.get("/v1/deployments/{name}", response_model=PlacementView, tags=["deployments"])
async def get_deployment(
    name: Annotated[str, Path(pattern=DEPLOYMENT_PATTERN)], store: Store
) -> PlacementView:
    """The active version and its entry stage: where new sessions start."""
    try:
        return await run_in_threadpool(store.deployment, name)
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from exc
