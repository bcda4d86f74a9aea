"""Worker HTTP routes: stage admin, the forward data path, emulation.

Loading, unloading and emulation changes need the admin token (edgeorch.service.auth);
forward steps and session releases need the stage's data-plane credential
(edgeorch.security.credentials); reads are open.
"""

from __future__ import annotations

import json
import re
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.routing import Route

from edgeorch.models.store import ModelStoreError
from edgeorch.runtime.checks import InputMismatch
from edgeorch.runtime.host import StageHost
from edgeorch.runtime.hosted import StageConflict, StageNotFound
from edgeorch.runtime.memory import OverMemory, proc_memory
from edgeorch.runtime.sessions import CacheFull, PositionMismatch, UnknownSession
from edgeorch.schemas.stage import ID_PATTERN, Emulation, StageInfo, StageSpec
from edgeorch.security.credentials import CREDENTIAL_HEADER, credential_ok
from edgeorch.service.auth import AdminAuth
from edgeorch.transport import wire
from edgeorch.transport.protocol import HOPS_HEADER, HopFailure

router = APIRouter()


async def get_host(request: Request) -> StageHost:
    return request.app.state.host


Host = Annotated[StageHost, Depends(get_host)]
StageId = Annotated[str, Path(pattern=ID_PATTERN)]


@router.put("/v1/stages/{stage_id}", response_model=StageInfo, tags=["stages"], dependencies=[AdminAuth])
async def put_stage(stage_id: StageId, spec: StageSpec, host: Host, response: Response) -> StageInfo:
    """Load units [start, end) of a model as a stage (idempotent for the same spec)."""
    try:
        info, created = await host.load(stage_id, spec)
    except ModelStoreError as exc:
        raise HTTPException(404, str(exc)) from exc
    except (StageConflict, OverMemory) as exc:
        raise HTTPException(409, str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc
    response.status_code = 201 if created else 200
    return info


@router.get("/v1/memory", tags=["stages"])
async def memory(host: Host, request: Request) -> dict[str, int | bool | None]:
    """Planned bytes (weights held + planned KV), the cap, and what /proc says this process holds
    (``engine_imported``: the engine's code was imported and warmed up, at startup)."""
    return {"limit": host.memory_limit, "param_bytes": host.units.held_bytes(),
            "planned_bytes": host.planned_bytes(), "kv_held_bytes": host.sessions.total_bytes(),
            "engine_imported": request.app.state.engine_imported.is_set(), **proc_memory()}  # fmt: skip


@router.get("/v1/stages", response_model=list[StageInfo], tags=["stages"])
async def list_stages(host: Host) -> list[StageInfo]:
    """Every stage loaded on this worker."""
    return [host.info(s) for s in list(host.stages)]


@router.get("/v1/stages/{stage_id}", response_model=StageInfo, tags=["stages"])
async def get_stage(stage_id: StageId, host: Host) -> StageInfo:
    """One loaded stage."""
    try:
        return host.info(stage_id)
    except StageNotFound as exc:
        raise HTTPException(404, str(exc)) from exc


@router.delete("/v1/stages/{stage_id}", tags=["stages"], dependencies=[AdminAuth])
async def delete_stage(stage_id: StageId, host: Host) -> dict[str, str]:
    """Unload a stage and drop its sessions."""
    try:
        host.unload(stage_id)
    except StageNotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    return {"deleted": stage_id}


@router.post("/v1/stages/{stage_id}/forward", tags=["data plane"])
async def forward(stage_id: StageId, request: Request, host: Host) -> Response:
    """Run one step (a frame of tokens or activations) and return the chain's answer as a frame.

    Requests are served by :func:`forward_fast` (same path, same answers);
    this declaration documents the route in the OpenAPI schema.
    """
    return await _forward(host, stage_id, request)


async def forward_fast(request: Request) -> Response:
    """The forward route without FastAPI's per-request dependency machinery.

    A decode step crosses this route once per stage, so FastAPI's parameter
    solving would be paid once per stage per token (measured in docs/design.md,
    "As built: the hop transport"). Registered ahead of :func:`forward`, which
    stays for the schema.
    """
    stage_id = request.path_params["stage_id"]
    if not _ID.match(stage_id):
        failure = HopFailure(422, f"stage id {stage_id[:200]!r} must match {ID_PATTERN}", "bad_request")
        return JSONResponse(failure.body(), failure.status)
    return await _forward(request.app.state.host, stage_id, request)


FAST_FORWARD_ROUTE = Route("/v1/stages/{stage_id}/forward", forward_fast, methods=["POST"])
_ID = re.compile(ID_PATTERN)


async def _forward(host: StageHost, stage_id: str, request: Request) -> Response:
    try:
        answer, hops = await _step(host, stage_id, request)
    except HopFailure as failure:
        # A relayed failure is counted where it happened; here it is only "downstream".
        own = failure.failed_stage == stage_id
        host.metrics.errors.labels(failure.kind if own else "downstream").inc()
        if stage_id in host.stages:
            host.metrics.requests.labels(stage_id, str(failure.status)).inc()
        return JSONResponse(failure.body(), failure.status)
    host.metrics.requests.labels(stage_id, "200").inc()
    return Response(answer, media_type=wire.CONTENT_TYPE, headers={HOPS_HEADER: json.dumps(hops)})


async def _step(host: StageHost, stage_id: str, request: Request) -> tuple[bytes, list[dict]]:
    """Run the step; every refusal becomes a HopFailure naming this stage and node."""
    check_credential(host, stage_id, request)
    limit = request.app.state.settings.max_frame_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _own(host, stage_id, 413, "limit", f"frame of {declared} bytes exceeds the limit of {limit}")
    body = await request.body()
    try:
        return await host.forward(stage_id, body, limit)
    except StageNotFound as exc:
        raise _own(host, stage_id, 404, "stage_missing", exc) from exc
    except wire.FrameTooLarge as exc:
        raise _own(host, stage_id, 413, "limit", exc) from exc
    except wire.FrameError as exc:
        raise _own(host, stage_id, 400, "bad_frame", exc) from exc
    except ValidationError as exc:
        raise _own(
            host, stage_id, 422, "bad_meta", f"frame metadata: {exc.errors(include_url=False)}"
        ) from exc
    except InputMismatch as exc:
        raise _own(host, stage_id, 422, "bad_input", exc) from exc
    except UnknownSession as exc:
        raise _own(host, stage_id, 404, "session_missing", exc) from exc
    except PositionMismatch as exc:
        raise _own(host, stage_id, 409, "position", exc) from exc
    except CacheFull as exc:
        raise _own(host, stage_id, 503, "cache_full", exc) from exc


def check_credential(host: StageHost, stage_id: str, request: Request) -> None:
    """A 401 HopFailure unless the call carries the stage's credential: before the body is read or any compute."""
    hosted = host.stages.get(stage_id)
    if hosted is not None and not credential_ok(
        hosted.spec.credential, request.headers.get(CREDENTIAL_HEADER)
    ):
        raise _own(host, stage_id, 401, "unauthorized",
                   f"stage {stage_id!r} needs its data-plane credential in {CREDENTIAL_HEADER}")  # fmt: skip


def _own(host: StageHost, stage_id: str, status: int, kind: str, detail: object) -> HopFailure:
    return HopFailure(status, str(detail), kind, stage_id, host.node_id)


@router.delete("/v1/stages/{stage_id}/sessions/{session}", tags=["data plane"], response_model=None)
async def release_session(
    stage_id: StageId, session: Annotated[str, Path(pattern=ID_PATTERN)], host: Host, request: Request
) -> JSONResponse | dict:
    """Free a session's KV cache on this stage and every later one (needs the stage credential)."""
    try:
        check_credential(host, stage_id, request)
    except HopFailure as failure:
        host.metrics.errors.labels(failure.kind).inc()
        return JSONResponse(failure.body(), failure.status)
    try:
        return {"released": await host.release(stage_id, session)}
    except StageNotFound as exc:
        raise HTTPException(404, str(exc)) from exc


@router.get("/v1/admin/emulation", response_model=Emulation, tags=["admin"])
async def get_emulation(host: Host) -> Emulation:
    """The emulated capacity in force."""
    return host.emulation


@router.post("/v1/admin/emulation", response_model=Emulation, tags=["admin"], dependencies=[AdminAuth])
async def set_emulation(emulation: Emulation, host: Host) -> Emulation:
    """Change the emulated compute slowdown, outgoing bandwidth and RTT at run time."""
    host.emulation = emulation
    return emulation
