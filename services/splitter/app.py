"""The splitter service: the Split Revision planner behind ``POST /v1/plan``.

A thin FastAPI app over :mod:`edgeorch.planning`. Planning is CPU-bound, so it
runs in worker threads (at most ``plan_threads`` at once) and the
event loop keeps answering probes and metrics meanwhile.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from pydantic import Field

from edgeorch.service.http_app import base_app
from edgeorch.service.limits import DEFAULT_MAX_BODY_BYTES
from edgeorch.service.settings import CommonSettings
from services.splitter.fast_path import PlanFastPath
from services.splitter.routes import PlanAnswer, PlanMetrics, plan_router

log = logging.getLogger(__name__)


class SplitterSettings(CommonSettings):
    """Knobs of the splitter, from EDGEORCH_* environment variables like every service's."""

    plan_threads: int = Field(default=2, ge=1, le=64, description="plans computed at the same time (threads)")


def create_app(settings: SplitterSettings | None = None) -> FastAPI:
    """A splitter app with its own metrics registry (one per call, so tests can make many)."""
    settings = settings or SplitterSettings()
    app, registry = base_app(
        "splitter",
        description="Split Revision: plans which node runs which units of a model (DESIGN.md §3-4).",
        trim_heap=True,
    )
    answer = PlanAnswer(PlanMetrics(registry), settings.plan_threads)
    app.include_router(plan_router(answer))
    # Outside the body limit and the routing: a plan request's body is parsed once, by pydantic's
    # JSON parser (services/splitter/fast_path.py).
    app.add_middleware(PlanFastPath, answer=answer, max_bytes=DEFAULT_MAX_BODY_BYTES)
    log.info("splitter ready: %d concurrent plans", settings.plan_threads)
    return app
