"""``POST /v1/plan``: validate, plan off the event loop, translate domain errors to 422."""

from __future__ import annotations

import logging
import time

import anyio
from fastapi import APIRouter, HTTPException
from prometheus_client import CollectorRegistry, Counter, Histogram

from edgeorch.planning import InfeasibleError, UnsupportedRequestError, plan_request
from edgeorch.planning.explain import cause_report
from edgeorch.schemas.plan import InfeasibleDetail, PlanRequest, PlanResponse

log = logging.getLogger(__name__)


class PlanMetrics:
    """The splitter's Prometheus metrics, in the app's own registry."""

    def __init__(self, registry: CollectorRegistry):
        self.plans = Counter(
            "splitter_plans_total",
            "Plans computed, by strategy, objective and whether proven optimal",
            ["strategy", "objective", "optimal"],
            registry=registry,
        )
        self.infeasible = Counter(
            "splitter_infeasible_total",
            "Requests answered 422 because no plan satisfies them",
            ["strategy", "objective"],
            registry=registry,
        )
        self.seconds = Histogram(
            "splitter_planning_seconds",
            "Time spent planning one request",
            ["strategy"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
            registry=registry,
        )


class PlanAnswer:
    """What ``POST /v1/plan`` answers for a validated request: ``(200, PlanResponse)`` or
    ``(422, detail)``; shared by the FastAPI route and the raw-body path (services/splitter/fast_path.py)."""

    def __init__(self, metrics: PlanMetrics, max_concurrent: int):
        self.metrics = metrics
        self.limiter = anyio.CapacityLimiter(max_concurrent)

    async def __call__(self, req: PlanRequest) -> tuple[int, PlanResponse | dict | str]:
        metrics, t0 = self.metrics, time.perf_counter()
        try:
            response = await anyio.to_thread.run_sync(plan_request, req, limiter=self.limiter)
        except InfeasibleError as error:
            metrics.infeasible.labels(req.strategy, req.objective).inc()
            detail = InfeasibleDetail(message=error.message, causes=[cause_report(c) for c in error.causes])
            log.info("plan infeasible (%s, %s): %s", req.strategy, req.objective, error.message)
            return 422, detail.model_dump()
        except UnsupportedRequestError as error:
            return 422, str(error)
        finally:
            metrics.seconds.labels(req.strategy).observe(time.perf_counter() - t0)
        metrics.plans.labels(req.strategy, req.objective, str(response.solver.optimal).lower()).inc()
        return 200, response


def plan_router(answer: PlanAnswer) -> APIRouter:
    """The router of ``POST /v1/plan``: the OpenAPI document's route, and the one that answers a
    request the raw-body path passes on."""
    router = APIRouter(tags=["plan"])

    @router.post(
        "/v1/plan",
        response_model=PlanResponse,
        responses={422: {"description": "malformed request, or no feasible plan (with causes)"}},
    )
    async def plan(req: PlanRequest) -> PlanResponse:
        """Plan which node runs which units, or say why no plan can."""
        status, result = await answer(req)
        if status != 200:
            raise HTTPException(status_code=status, detail=result)
        return result

    return router
