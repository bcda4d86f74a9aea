"""Batch jobs on the gateway: `POST /v1/jobs` queues prompts on Celery, `GET /v1/jobs/{id}` reports them.

The router reads ``app.state.settings`` (``redis_url``, ``api_keys``) and ``app.state.gateway_url`` (where the Celery task sends each
prompt back: this gateway's own ``/v1/completions``). Celery's client is
blocking, so every call to it runs in the thread pool.

Celery answers PENDING for any id it never saw, so each job is also recorded in
Redis (``edgeorch:job:{id}``, with its size, one day) when it is submitted:
an id without that record is a 404.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from typing import Annotated, Any, Literal

import redis
from celery import Celery
from celery.result import AsyncResult
from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from edgeorch.service.bus import live_key
from edgeorch.service.jobs import BATCH_TASK, JOB_TTL_S, jobs_queue, make_celery

log = logging.getLogger(__name__)

JobState = Literal["pending", "running", "succeeded", "failed"]
# Celery's states onto ours; RETRY and PROGRESS are still running.
_STATES: dict[str, JobState] = {
    "PENDING": "pending",
    "RECEIVED": "pending",
    "STARTED": "running",
    "PROGRESS": "running",
    "RETRY": "running",
    "SUCCESS": "succeeded",
    "FAILURE": "failed",
    "REVOKED": "failed",
}


class JobRequest(BaseModel):
    """A batch of prompts for one deployment, completed with the same sampling parameters."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256, description="a deployment name")
    prompts: list[Annotated[str, Field(max_length=100_000)]] = Field(min_length=1, max_length=1000)
    max_tokens: int = Field(default=16, ge=1, le=4096)
    temperature: float = Field(default=1.0, ge=0, le=2, allow_inf_nan=False)


class JobAccepted(BaseModel):
    """A job that was queued."""

    id: str
    state: JobState


class JobView(BaseModel):
    """A job's progress; ``results`` (one ``{prompt, text, error}`` per prompt) once it succeeded."""

    id: str
    state: JobState
    done: int
    total: int
    results: list[dict[str, Any]] | None = None
    error: str | None = None


def _job_key(job_id: str) -> str:
    return live_key("job", job_id)


def _api_keys(settings: Any) -> list[str]:
    """The configured API keys; the setting is a comma-separated string (a list is taken as is)."""
    raw = getattr(settings, "api_keys", "") or ""
    items = raw if isinstance(raw, list | tuple | set) else str(raw).split(",")
    return [k.strip() for k in items if k and k.strip()]


def _bearer(request: Request) -> str:
    scheme, _, credentials = (request.headers.get("authorization") or "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else ""


async def require_client(request: Request) -> str:
    """Like the completions: with API keys configured, one of them is required.

    Returns the key the caller gave, which the job presents to ``/v1/completions`` in turn (so
    the admin token, which the completions do not take, is no key here either).
    """
    keys = _api_keys(request.app.state.settings)
    given = _bearer(request)
    if not keys:
        return given
    # Compare against every key, so the time taken does not say which one matched.
    if given and any([hmac.compare_digest(given.encode(), k.encode()) for k in keys]):
        return given
    log.warning("refused %s %s: missing or unknown API key", request.method, request.url.path)
    raise HTTPException(
        401, "this call needs Authorization: Bearer <API key>", headers={"WWW-Authenticate": "Bearer"}
    )


ClientToken = Annotated[str, Depends(require_client)]


class JobQueue:
    """The Celery client and the Redis job records of one gateway; blocking, call from threads."""

    def __init__(self, redis_url: str, queue: str):
        self.celery: Celery = make_celery(redis_url, queue)
        self.redis = redis.Redis.from_url(redis_url, socket_connect_timeout=2.0, socket_timeout=5.0)

    def submit(self, gateway_url: str, job: JobRequest, token: str) -> str:
        """Record the job, then queue it; returns its id."""
        job_id = uuid.uuid4().hex
        record = {"total": len(job.prompts), "model": job.model, "created_at": time.time()}
        # The record first: a worker fast enough to finish before it is written must not look unknown.
        self.redis.set(_job_key(job_id), json.dumps(record), ex=JOB_TTL_S)
        params = {"max_tokens": job.max_tokens, "temperature": job.temperature}
        self.celery.send_task(
            BATCH_TASK, args=[gateway_url, job.model, job.prompts, params, token], task_id=job_id
        )
        return job_id

    def view(self, job_id: str) -> JobView | None:
        """The job's state, or None for an id that was never submitted (or expired)."""
        raw = self.redis.get(_job_key(job_id))
        if raw is None:
            return None
        total = int(json.loads(raw)["total"])
        result = AsyncResult(job_id, app=self.celery)
        state = _STATES.get(result.state, "running")
        info = result.info
        view = JobView(id=job_id, state=state, done=0, total=total)
        if state == "succeeded":
            view.results = list(info or [])
            view.done = len(view.results)
        elif state == "failed":
            view.error = repr(info) if info is not None else "the job failed"
        elif isinstance(info, dict):
            view.done = int(info.get("done", 0))
        return view


def _queue(request: Request) -> JobQueue:
    """The app's JobQueue, made on first use from its settings."""
    state = request.app.state
    queue = getattr(state, "job_queue", None)
    if queue is None:
        settings = state.settings
        name = getattr(settings, "jobs_queue", None) or jobs_queue()
        queue = state.job_queue = JobQueue(settings.redis_url, name)
    return queue


def _unavailable(exc: Exception) -> HTTPException:
    log.warning("job queue unavailable: %r", exc)
    return HTTPException(503, f"the job queue (Redis) is unavailable: {exc}")


def jobs_router() -> APIRouter:
    """`POST /v1/jobs` and `GET /v1/jobs/{id}`."""
    router = APIRouter(tags=["jobs"])

    @router.post("/v1/jobs", status_code=202, response_model=JobAccepted)
    async def submit_job(job: JobRequest, request: Request, token: ClientToken) -> JobAccepted:
        """Queue a batch of completions; poll `GET /v1/jobs/{id}` for progress and results."""
        queue = _queue(request)
        try:
            job_id = await run_in_threadpool(queue.submit, request.app.state.gateway_url, job, token)
        except (redis.RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        log.info("job %s queued: %d prompts for %s", job_id, len(job.prompts), job.model)
        return JobAccepted(id=job_id, state="pending")

    @router.get("/v1/jobs/{job_id}", response_model=JobView)
    async def get_job(job_id: str, request: Request, _token: ClientToken) -> JobView:
        """A job's state, progress (`done` of `total`) and, once finished, its results."""
        queue = _queue(request)
        try:
            view = await run_in_threadpool(queue.view, job_id)
        except (redis.RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        if view is None:
            raise HTTPException(404, f"no job {job_id!r} (unknown, or finished more than a day ago)")
        return view

    return router
