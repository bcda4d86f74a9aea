"""Orchestrator routes for operators: deployments and the decision log."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request
from starlette.concurrency import run_in_threadpool

from edgeorch.schemas.orchestrator import DeploymentRequest, DeploymentView, OrchestratorEvent
from edgeorch.schemas.rollout import DEPLOYMENT_PATTERN
from edgeorch.service.auth import AdminAuth
from edgeorch.service.limits import MAX_SQL_INT
from services.orchestrator.deployments import UnknownModel
from services.orchestrator.store import Conflict, NotFound

router = APIRouter()
Name = Annotated[str, Path(pattern=DEPLOYMENT_PATTERN)]


@router.post("/v1/deployments", status_code=201, response_model=DeploymentView, tags=["deployments"],
             dependencies=[AdminAuth])  # fmt: skip
async def create_deployment(req: DeploymentRequest, request: Request) -> DeploymentView:
    """Serve a model under a QoS policy; planning and rollout start in the background (state pending)."""
    try:
        return await request.app.state.book.create(req)
    except UnknownModel as exc:
        raise HTTPException(404, str(exc)) from exc
    except Conflict as exc:
        raise HTTPException(409, str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc


@router.get("/v1/deployments", response_model=list[DeploymentView], tags=["deployments"])
async def list_deployments(request: Request) -> list[DeploymentView]:
    """Every deployment with its state, active plan and history."""
    book = request.app.state.book
    return [await book.view(n) for n in await run_in_threadpool(book.store.names)]


@router.get("/v1/deployments/{name}", response_model=DeploymentView, tags=["deployments"])
async def get_deployment(name: Name, request: Request) -> DeploymentView:
    """State (pending, ready, degraded, failed), active plan and version, predicted and measured, history."""
    try:
        return await request.app.state.book.view(name)
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from exc


@router.delete("/v1/deployments/{name}", status_code=204, tags=["deployments"], dependencies=[AdminAuth])
async def delete_deployment(name: Name, request: Request) -> None:
    """Stop serving a deployment and forget its history (its stages stay until the next rollout)."""
    try:
        await request.app.state.book.delete(name)
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from exc


@router.get("/v1/events", response_model=list[OrchestratorEvent], tags=["events"])
async def list_events(
    request: Request,
    since: Annotated[int, Query(ge=0, le=MAX_SQL_INT)] = 0,
    deployment: Annotated[str | None, Query(pattern=DEPLOYMENT_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> list[OrchestratorEvent]:
    """The decision log after event ``since``: deploys, keeps, remaps, re-splits, recoveries, measurements."""
    return await run_in_threadpool(request.app.state.store.events, since, deployment, limit)


NodeName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]


@router.get("/v1/spot-checks", tags=["events"])
async def spot_checks(request: Request) -> dict:
    """Spot checks of untrusted nodes: counts, the latest verdicts, and the nodes that failed one (suspect)."""
    routes = request.app.state.routes
    checker = routes.checker
    recent = [] if checker is None else [asdict(v) for v in checker.verdicts[-20:]]
    return {"enabled": checker is not None, "share": checker.share if checker else 0.0,
            "counts": dict(checker.counts) if checker else {}, "recent": recent,
            "suspects": dict(routes.distrusted)}  # fmt: skip


@router.delete("/v1/spot-checks/suspects/{node}", status_code=204, tags=["events"], dependencies=[AdminAuth])
async def trust_again(node: NodeName, request: Request) -> None:
    """An operator's word that a suspect node is fixed: plans may use it again."""
    if not request.app.state.routes.trust_again(node):
        raise HTTPException(404, f"node {node!r} is not suspect")
    request.app.state.controller.poke_all(f"{node} trusted again by an operator")
