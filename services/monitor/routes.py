"""Monitor HTTP routes."""

from __future__ import annotations

import time
from typing import Annotated, Literal

import orjson
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from pydantic import BaseModel, Field, TypeAdapter
from starlette.concurrency import run_in_threadpool

from edgeorch.monitoring.cluster import UnknownNode
from edgeorch.schemas.monitor import Heartbeat, HeartbeatReply, LinkView, MonitorEvent, NodeView, Registration
from edgeorch.schemas.stage import ID_PATTERN
from edgeorch.service.auth import AdminAuth
from edgeorch.service.limits import MAX_SQL_INT

router = APIRouter()
_NODE_VIEWS = TypeAdapter(list[NodeView])


async def get_monitor(request: Request):
    return request.app.state.monitor


Mon = Annotated[object, Depends(get_monitor)]
NodeId = Annotated[str, Path(pattern=ID_PATTERN)]


# Registration and heartbeats stay open to every worker: they are the data the
# control plane decides from, not orders, and a worker holds no admin token.
@router.post("/v1/nodes", tags=["nodes"])
async def register(reg: Registration, monitor: Mon) -> dict:
    """Register a node (idempotent; a returning node is welcomed back)."""
    await monitor.register(reg)
    return {"node_id": reg.node_id, "registered": True}


@router.post("/v1/nodes/{node_id}/heartbeat", response_model=HeartbeatReply, tags=["nodes"])
async def heartbeat(node_id: NodeId, hb: Heartbeat, monitor: Mon) -> Response:
    """Live load and fresh measurements from a node."""
    try:
        # Already JSON (cached per node, see Monitor.reply): no second validation on the way out.
        return Response(await monitor.heartbeat(node_id, hb), media_type="application/json")
    except UnknownNode as exc:
        raise HTTPException(404, str(exc)) from exc


@router.get("/v1/nodes", response_model=list[NodeView], tags=["nodes"])
async def list_nodes(
    monitor: Mon,
    model: Annotated[
        str | None, Query(max_length=256, description="report flops_per_s for this model")
    ] = None,
    state: Literal["alive", "lost"] | None = None,
) -> Response:
    """Every known node: static capacity, calibrated speed per model, live load, state."""
    views = [monitor.cluster.node_view(r, model) for r in monitor.cluster.nodes.values()]
    # Serialised without response_model's second validation (1,000 views per look at 1,000 nodes).
    return Response(_NODE_VIEWS.dump_json([v for v in views if state is None or v.state == state]),
                    media_type="application/json")  # fmt: skip


@router.get("/v1/nodes/{node_id}", response_model=NodeView, tags=["nodes"])
async def get_node(node_id: NodeId, monitor: Mon, model: str | None = None) -> NodeView:
    """One node."""
    rec = monitor.cluster.nodes.get(node_id)
    if rec is None:
        raise HTTPException(404, f"node {node_id!r} is not registered")
    return monitor.cluster.node_view(rec, model)


@router.get("/v1/links", response_model=list[LinkView], tags=["links"])
async def list_links(monitor: Mon, include_lost: bool = False) -> Response:
    """Measured bandwidth and RTT per directed pair of live nodes."""
    # Serialised as is: the fields are LinkView's, and re-validating 16,000 of them at 1,000 nodes
    # (response_model) cost more than everything else the route does.
    return Response(orjson.dumps(monitor.cluster.link_dicts(alive_only=not include_lost, now=time.time())),
                    media_type="application/json")  # fmt: skip


@router.get("/v1/events", response_model=list[MonitorEvent], tags=["events"])
async def list_events(
    monitor: Mon,
    since: Annotated[int, Query(ge=0, le=MAX_SQL_INT, description="only events with a larger id")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[MonitorEvent]:
    """Detected changes, oldest first."""
    return await run_in_threadpool(monitor.store.events, since, limit)


class ProfileRequest(BaseModel):
    """A model every node should calibrate."""

    model: str = Field(
        min_length=1, max_length=270, description="a profile key: a model, or model@format (bf16, int8, int4)"
    )


@router.post("/v1/profiles", status_code=202, tags=["profiles"], dependencies=[AdminAuth])
async def request_profile(body: ProfileRequest, monitor: Mon) -> dict:
    """Ask every node, now and as they join, to calibrate a model; results arrive as `profiled` events."""
    await monitor.request_profile(body.model)
    return {
        "model": body.model,
        "nodes": sorted(n for n, r in monitor.cluster.nodes.items() if r.state == "alive"),
    }


@router.get("/v1/profiles", tags=["profiles"])
async def list_profiles(monitor: Mon) -> dict:
    """Models being calibrated and the calibration of each node."""
    return {
        "models": monitor.profile_models,
        "nodes": {
            n: {m: p.model_dump() for m, p in r.profiles.items()} for n, r in monitor.cluster.nodes.items()
        },
    }
