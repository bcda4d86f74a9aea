"""The parts every edgeorch FastAPI service shares: probes, metrics, errors.

Each service builds its app with :func:`base_app` and adds its own routes.
Metrics live in a registry per app (not prometheus_client's global one), so a
test process can hold several apps without "duplicated timeseries" errors.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from edgeorch.service.heap import start_heap_trimmer
from edgeorch.service.limits import DEFAULT_MAX_BODY_BYTES, BodyLimit

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], Awaitable[dict[str, str]]]


async def _always_ready() -> dict[str, str]:
    return {}


def base_app(
    service: str,
    *,
    description: str,
    ready_check: ReadyCheck = _always_ready,
    lifespan=None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    trim_heap: bool = False,
) -> tuple[FastAPI, CollectorRegistry]:
    """A FastAPI app with `/healthz`, `/readyz`, `/metrics`, JSON errors and a body size limit.

    ``trim_heap``: the process's freed heap is returned to the system every few
    seconds (:mod:`edgeorch.service.heap`); the control-plane services ask for
    it, the workers do not (its cost to a decode step is not measured).

    ``ready_check`` returns a mapping of dependency name to a problem string;
    an empty mapping means ready. It must not raise. A request body over
    ``max_body_bytes`` is answered 413 before the app reads it.
    """
    from edgeorch import __version__

    app = FastAPI(
        title=f"edgeorch {service}", version=__version__, description=description, lifespan=lifespan
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if trim_heap:  # freed heap goes back to the system (edgeorch/service/heap.py)
        start_heap_trimmer()
    registry = CollectorRegistry()
    app.state.metrics_registry = registry

    @app.get("/healthz", tags=["probes"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok", "service": service}

    @app.get("/readyz", tags=["probes"])
    async def readyz() -> JSONResponse:
        """Readiness: every dependency this service needs is reachable."""
        problems = await ready_check()
        if problems:
            return JSONResponse({"status": "not ready", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready", "service": service})

    @app.get("/metrics", tags=["probes"], response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus text exposition of this service's metrics."""
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default already answers 422; this keeps the body JSON-safe
        # when the offending input was bytes or NaN.
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    return app, registry
