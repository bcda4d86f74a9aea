"""Worker HTTP routes of KV migration: export a session's KV slice, pull one from the previous plan.

Both are on the data path, like forward steps and session releases, and need
the stage's data-plane credential like them: they read or build the caches of sessions, never load code or weights, and every
byte received is parsed as a checked KV frame (no pickle).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from edgeorch.runtime.host import StageHost
from edgeorch.runtime.kv_transfer import KVTransferError, export_kv, pull_kv
from edgeorch.runtime.sessions import CacheFull
from edgeorch.schemas.stage import ID_PATTERN
from edgeorch.transport import wire
from edgeorch.transport.kv_frames import KVPull, KVPullReport
from edgeorch.transport.protocol import HopFailure
from services.worker.routes import check_credential

router = APIRouter(tags=["data plane"])


async def get_host(request: Request) -> StageHost:
    return request.app.state.host


Host = Annotated[StageHost, Depends(get_host)]
Id = Annotated[str, Path(pattern=ID_PATTERN)]


@router.get("/v1/stages/{stage_id}/sessions/{session}/kv")
async def get_kv(
    stage_id: Id,
    session: Id,
    host: Host,
    unit_start: Annotated[int, Query(ge=1)],
    unit_end: Annotated[int, Query(ge=2)],
    start: Annotated[int, Query(ge=0)],
    end: Annotated[int, Query(gt=0)],
    request: Request,
) -> Response:
    """The session's keys and values of layer units [unit_start, unit_end) at positions [start, end), as a KV frame."""
    if refused := _refused(host, stage_id, request):
        return refused
    try:
        body = await export_kv(host, stage_id, session, range(unit_start, unit_end), start, end)
    except KVTransferError as exc:
        raise HTTPException(exc.status, exc.detail) from exc
    return Response(body, media_type=wire.CONTENT_TYPE)


@router.post("/v1/stages/{stage_id}/sessions/{session}/kv/pull", response_model=KVPullReport)
async def post_pull(
    stage_id: Id, session: Id, pull: KVPull, host: Host, request: Request
) -> KVPullReport | JSONResponse:
    """Build the session's cache on this stage from the previous plan's stages (copy here, fetch elsewhere)."""
    if refused := _refused(host, stage_id, request):
        return refused
    try:
        return await pull_kv(host, stage_id, session, pull, request.app.state.settings.kv_max_frame_bytes)
    except KVTransferError as exc:
        raise HTTPException(exc.status, exc.detail) from exc
    except CacheFull as exc:
        raise HTTPException(503, str(exc)) from exc


def _refused(host: StageHost, stage_id: str, request: Request) -> JSONResponse | None:
    """The protocol's 401 error JSON when the call lacks the stage's data-plane credential, else None."""
    try:
        check_credential(host, stage_id, request)
    except HopFailure as failure:
        return JSONResponse(failure.body(), failure.status)
    return None
