"""The jobs API without a Celery worker: auth, validation, Redis trouble, job records, the task's pieces.

The gateway and the worker are real in tests/e2e/test_jobs.py; here the routes run
in-process against the suite's real Redis (or a port nothing answers on).
"""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from edgeorch.local.launcher import free_port
from edgeorch.service.jobs import celery_app, complete_one, worker_argv
from services.orchestrator.jobs_routes import JobQueue, jobs_router

LIVE_REDIS = "redis://127.0.0.1:6379/0"
JOB = {"model": "tiny", "prompts": ["a", "b"], "max_tokens": 4, "temperature": 0}


def _client(api_keys: str = "", redis_url: str | None = None) -> TestClient:
    app = FastAPI()
    app.state.settings = SimpleNamespace(
        redis_url=redis_url or f"redis://127.0.0.1:{free_port()}/0", api_keys=api_keys, admin_token="adm"
    )
    app.state.gateway_url = "http://127.0.0.1:9"
    app.include_router(jobs_router())
    return TestClient(app)


@pytest.mark.parametrize("auth", [None, "Bearer adm", "Bearer wrong", "Basic k1", "Bearer "])
def test_with_api_keys_a_valid_key_is_required(auth: str | None) -> None:
    client = _client(api_keys="k1, k2")
    headers = {"Authorization": auth} if auth else {}
    for resp in (
        client.post("/v1/jobs", json=JOB, headers=headers),
        client.get("/v1/jobs/x", headers=headers),
    ):
        assert resp.status_code == 401, resp.text
        assert resp.headers["www-authenticate"] == "Bearer"
        assert "API key" in resp.json()["detail"]


def test_a_valid_key_gets_past_auth_and_redis_trouble_is_a_503() -> None:
    client = _client(api_keys="k1,k2")
    for key in ("k1", "k2"):
        resp = client.post("/v1/jobs", json=JOB, headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 503, resp.text
        assert "job queue" in resp.json()["detail"]
    assert client.get("/v1/jobs/x", headers={"Authorization": "Bearer k1"}).status_code == 503


@pytest.mark.parametrize(
    "body",
    [
        {**JOB, "prompts": []},
        {**JOB, "prompts": ["x"] * 1001},
        {**JOB, "prompts": [1, 2]},
        {**JOB, "max_tokens": 0},
        {**JOB, "temperature": 3},
        {**JOB, "unknown": 1},
        {"prompts": ["x"]},
    ],
)
def test_malformed_jobs_are_422(body: dict) -> None:
    assert _client().post("/v1/jobs", json=body).status_code == 422


def test_an_id_without_a_record_is_404_and_a_recorded_one_is_pending() -> None:
    client = _client(redis_url=LIVE_REDIS)
    job_id = f"test-{uuid.uuid4().hex}"
    assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    queue = JobQueue(LIVE_REDIS, f"test-{uuid.uuid4().hex[:8]}")
    key = f"edgeorch:job:{job_id}"
    queue.redis.set(key, json.dumps({"total": 7, "model": "tiny", "created_at": 0}), ex=60)
    try:
        view = client.get(f"/v1/jobs/{job_id}").json()
        assert view == {
            "id": job_id,
            "state": "pending",
            "done": 0,
            "total": 7,
            "results": None,
            "error": None,
        }
    finally:
        queue.redis.delete(key)


def test_a_prompt_the_gateway_cannot_take_is_recorded_with_its_error() -> None:
    with httpx.Client(timeout=2) as http:
        result = complete_one(http, f"http://127.0.0.1:{free_port()}", "tiny", "hello", {}, "")
    assert result["prompt"] == "hello" and result["text"] is None
    assert result["error"].startswith("gateway unreachable")


def test_worker_argv_is_a_light_thread_pool_on_the_jobs_queue() -> None:
    argv = worker_argv(3, "info")
    assert argv[0] == "worker"
    assert {"--pool=threads", "--concurrency=3", "--loglevel=INFO", "--hostname=jobs@%h"} <= set(argv)
    assert f"--queues={celery_app.conf.task_default_queue}" in argv
    assert "--hostname=jobs-1@h" in worker_argv(1, "INFO", "jobs-1@h")
