"""Worker routes for measurement: link probe sink and on-demand calibration."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from edgeorch.models.store import ModelStoreError
from edgeorch.schemas.monitor import ProfileReport

router = APIRouter(tags=["measurement"])


@router.post("/v1/probe/sink")
async def probe_sink(request: Request) -> dict[str, int]:
    """Swallow a probe payload; peers time this to measure the link."""
    n = 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > 8 << 20:
            raise HTTPException(413, "probe payloads are at most 8 MiB")
    return {"bytes": n}


class ProfileRequest(BaseModel):
    """Which model to calibrate."""

    model: str = Field(min_length=1, max_length=270, description="a model, or model@format")


@router.post("/v1/profile", response_model=ProfileReport)
async def profile(body: ProfileRequest, request: Request) -> ProfileReport:
    """Calibrate a model on this node now: measured seconds per unit, prefill and decode."""
    agent = request.app.state.agent
    if agent is None:
        raise HTTPException(409, "this worker has no monitor agent (EDGEORCH_MONITOR_URL is unset)")
    try:
        return await agent.profile(body.model)
    except ModelStoreError as exc:
        raise HTTPException(404, str(exc)) from exc
    except ValueError as exc:  # a model this engine cannot run, or in that format
        raise HTTPException(422, str(exc)) from exc
