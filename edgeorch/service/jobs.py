"""Long jobs on Celery (Redis broker and result backend): batches of completions through the gateway.

A batch job does not touch the model itself: it sends each prompt to the
orchestrator's own ``/v1/completions``, so a job is served by the same
deployments, plans and recovery as interactive traffic, and a job worker
needs neither torch nor the model store.

``celery_app`` is built from ``EDGEORCH_REDIS_URL`` at import time because the
Celery worker (``edgeorch jobs-worker``, or ``celery -A edgeorch.service.jobs:celery_app``)
needs a module-level app. Senders that have settings of their own (the
orchestrator's jobs routes) build a client with :func:`make_celery` and send by
task name, so they never depend on the environment of the process they run in.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import httpx
from celery import Celery

from edgeorch.security.certs import client_verify

log = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE = "edgeorch-jobs"
BATCH_TASK = "edgeorch.batch_completions"
JOB_TTL_S = 86_400  # results and the job record live a day
REQUEST_TIMEOUT_S = 600.0  # one completion; long generations on slow emulated nodes take minutes


def jobs_queue() -> str:
    """The Celery queue jobs travel on (``EDGEORCH_JOBS_QUEUE``); stacks sharing one Redis may differ."""
    return os.environ.get("EDGEORCH_JOBS_QUEUE") or DEFAULT_QUEUE


def make_celery(redis_url: str, queue: str | None = None) -> Celery:
    """A Celery app on ``redis_url`` (broker and results) that sends and consumes on ``queue``."""
    app = Celery("edgeorch", broker=redis_url, backend=redis_url)
    app.conf.update(
        task_default_queue=queue or jobs_queue(),
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_track_started=True,  # "running" as soon as a worker takes the job, before its first prompt
        result_expires=JOB_TTL_S,
        result_extended=True,
        # A job is many prompts long; a worker must not reserve jobs it cannot start yet.
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


celery_app = make_celery(os.environ.get("EDGEORCH_REDIS_URL") or DEFAULT_REDIS_URL)


def complete_one(
    client: httpx.Client, gateway_url: str, model: str, prompt: str, params: dict[str, Any], token: str
) -> dict[str, Any]:
    """One prompt through ``{gateway_url}/v1/completions``: ``{"prompt", "text", "error"}``, never raising."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {**params, "model": model, "prompt": prompt, "stream": False}
    try:
        resp = client.post(f"{gateway_url.rstrip('/')}/v1/completions", json=body, headers=headers)
    except httpx.HTTPError as exc:
        return {"prompt": prompt, "text": None, "error": f"gateway unreachable: {exc!r}"}
    if resp.status_code != 200:
        return {"prompt": prompt, "text": None, "error": f"HTTP {resp.status_code}: {_detail(resp)}"}
    try:
        text = resp.json()["choices"][0]["text"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return {"prompt": prompt, "text": None, "error": f"malformed completion: {exc!r}"}
    return {"prompt": prompt, "text": text, "error": None}


def _detail(resp: httpx.Response) -> str:
    """The ``detail`` of an edgeorch error answer, or the start of the body."""
    try:
        return str(resp.json().get("detail", resp.text))[:500]
    except (ValueError, AttributeError):
        return resp.text[:500]


@celery_app.task(bind=True, name=BATCH_TASK)
def batch_completions(
    self, gateway_url: str, model: str, prompts: list[str], params: dict[str, Any], token: str
) -> list[dict[str, Any]]:
    """Complete every prompt in order; a failing prompt is recorded with its error and the batch goes on."""
    n = len(prompts)
    results: list[dict[str, Any]] = []
    log.info("job %s: %d prompts for %s via %s", self.request.id, n, model, gateway_url)
    self.update_state(state="PROGRESS", meta={"done": 0, "total": n})
    with httpx.Client(timeout=REQUEST_TIMEOUT_S, verify=client_verify()) as client:
        for i, prompt in enumerate(prompts, start=1):
            results.append(complete_one(client, gateway_url, model, prompt, params, token))
            if results[-1]["error"]:
                log.warning("job %s: prompt %d/%d failed: %s", self.request.id, i, n, results[-1]["error"])
            self.update_state(state="PROGRESS", meta={"done": i, "total": n})
    failed = sum(1 for r in results if r["error"])
    log.info("job %s: done, %d of %d prompts failed", self.request.id, failed, n)
    return results


def worker_argv(concurrency: int, log_level: str, hostname: str | None = None) -> list[str]:
    """Arguments for ``celery_app.worker_main``: a thread pool, light on a small machine."""
    argv = [
        "worker",
        "--pool=threads",  # jobs wait on HTTP, not on the CPU: threads are enough and cost no fork
        f"--concurrency={concurrency}",
        f"--loglevel={log_level.upper()}",
        f"--queues={celery_app.conf.task_default_queue}",
        # No gossip or mingle: workers need not know each other, and mingle waits for replies at start.
        "--without-gossip",
        "--without-mingle",
    ]
    # %h is the host name: `celery inspect ping -d jobs@<host>` finds the worker by it.
    argv.append(f"--hostname={hostname or 'jobs@%h'}")
    return argv
