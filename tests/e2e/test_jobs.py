"""Batch jobs end to end: the whole local stack, a tiny-llama deployment, a Celery job through the gateway.

A job's answers must be exactly what the same prompts get from `/v1/completions`
directly (greedy decoding), a failing prompt among good ones is recorded rather
than failing the job, and unknown ids are 404. The gateway requires API keys
(EDGEORCH_API_KEYS): calls without one are refused, and a job presents its
caller's key to the completions it makes. The curl scripts in scripts/ are
driven against the same stack.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess

import httpx
import pytest

from edgeorch.local.stack import LocalStack
from tests.support import REPO, wait_for

PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3,"]
PARAMS = {"max_tokens": 8, "temperature": 0}
KEY_A, KEY_B = secrets.token_hex(8), secrets.token_hex(8)
AUTH = {"Authorization": f"Bearer {KEY_A}"}


@pytest.fixture(scope="module")
def stack(store, tmp_path_factory):
    """Two workers; a private Redis when redis-server is here, so other runs' events stay out."""
    with LocalStack(
        workers=2, model_store=store.root, log_dir=tmp_path_factory.mktemp("logs"),
        private_redis=shutil.which("redis-server") is not None, start_timeout_s=180, api_keys=[KEY_A, KEY_B],
    ) as s:  # fmt: skip
        admin = {"Authorization": f"Bearer {s.admin_token}"}
        body = {"name": "tiny", "model": "tiny-llama"}
        created = httpx.post(f"{s.orchestrator_url}/v1/deployments", json=body, headers=admin, timeout=60)
        assert created.status_code == 201, created.text

        def ready():
            view = httpx.get(f"{s.orchestrator_url}/v1/deployments/tiny", timeout=30).json()
            assert view["state"] != "failed", view
            return view["state"] == "ready"

        wait_for(ready, 180, "deployment tiny ready")
        yield s


def _poll(stack: LocalStack, job_id: str, timeout_s: float = 180) -> dict:
    def finished():
        job = httpx.get(f"{stack.orchestrator_url}/v1/jobs/{job_id}", headers=AUTH, timeout=30).json()
        return job if job["state"] in ("succeeded", "failed") else None

    return wait_for(finished, timeout_s, f"job {job_id} finished")


def _complete(stack: LocalStack, prompt: str, max_tokens: int = PARAMS["max_tokens"]) -> str:
    body = {"model": "tiny", "prompt": prompt, **PARAMS, "max_tokens": max_tokens}
    resp = httpx.post(f"{stack.orchestrator_url}/v1/completions", json=body, headers=AUTH, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def _submit(stack: LocalStack, prompts: list[str], model: str = "tiny", headers=AUTH) -> httpx.Response:
    return httpx.post(f"{stack.orchestrator_url}/v1/jobs", json={"model": model, "prompts": prompts, **PARAMS},
                      headers=headers, timeout=30)  # fmt: skip


def test_a_job_answers_like_direct_completions(stack) -> None:
    resp = _submit(stack, PROMPTS)
    assert resp.status_code == 202, resp.text
    accepted = resp.json()
    assert set(accepted) == {"id", "state"} and accepted["state"] == "pending"
    job = _poll(stack, accepted["id"])
    assert job["state"] == "succeeded", job
    assert (job["done"], job["total"]) == (3, 3)
    results = job["results"]
    assert [r["prompt"] for r in results] == PROMPTS
    for r in results:
        assert r["error"] is None and r["text"], r
        assert r["text"] == _complete(stack, r["prompt"]), r


def test_a_failing_prompt_among_good_ones_is_recorded_not_fatal(stack) -> None:
    # The empty prompt is valid in a job but refused by /v1/completions (422).
    prompts = [PROMPTS[0], "", PROMPTS[2]]
    resp = _submit(stack, prompts)
    assert resp.status_code == 202, resp.text
    job = _poll(stack, resp.json()["id"])
    assert job["state"] == "succeeded" and (job["done"], job["total"]) == (3, 3), job
    good, bad, also_good = job["results"]
    assert bad["text"] is None and bad["error"].startswith("HTTP 422"), bad
    for r in (good, also_good):
        assert r["error"] is None and r["text"] == _complete(stack, r["prompt"]), r


def test_a_job_for_an_unknown_deployment_records_every_prompt_as_404(stack) -> None:
    resp = _submit(stack, ["a", "b"], model="no-such-deployment")
    assert resp.status_code == 202, resp.text
    job = _poll(stack, resp.json()["id"])
    assert job["state"] == "succeeded" and job["done"] == 2, job
    for r in job["results"]:
        assert r["text"] is None and r["error"].startswith("HTTP 404"), r


def test_the_gateway_refuses_calls_without_a_key(stack) -> None:
    url = stack.orchestrator_url
    body = {"model": "tiny", "prompt": PROMPTS[0], **PARAMS}
    for headers in (
        {},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": f"Bearer {stack.admin_token}"},
    ):
        assert httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30).status_code == 401
        assert httpx.get(f"{url}/v1/models", headers=headers, timeout=30).status_code == 401
        assert _submit(stack, PROMPTS[:1], headers=headers).status_code == 401
    # Either configured key opens it.
    other = {"Authorization": f"Bearer {KEY_B}"}
    assert httpx.post(f"{url}/v1/completions", json=body, headers=other, timeout=120).status_code == 200


def test_a_job_presents_its_callers_key(stack) -> None:
    # Submitted with the second key: every completion the job makes needs a key too,
    # and the job presents the one its caller gave (a 401 would be recorded per prompt).
    resp = _submit(stack, PROMPTS[:2], headers={"Authorization": f"Bearer {KEY_B}"})
    assert resp.status_code == 202, resp.text
    job = _poll(stack, resp.json()["id"])
    assert job["state"] == "succeeded", job
    for r in job["results"]:
        assert r["error"] is None and r["text"] == _complete(stack, r["prompt"]), r


def test_unknown_job_is_404(stack) -> None:
    resp = httpx.get(f"{stack.orchestrator_url}/v1/jobs/0123456789abcdef", headers=AUTH, timeout=30)
    assert resp.status_code == 404
    assert "no job" in resp.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"model": "tiny", "prompts": []},
        {"model": "tiny", "prompts": ["x"] * 1001},
        {"model": "tiny", "prompts": "not a list"},
        {"model": "tiny", "prompts": ["x"], "max_tokens": 0},
        {"model": "tiny", "prompts": ["x"], "colour": "blue"},
    ],
)
def test_malformed_jobs_are_422(stack, body) -> None:
    assert (
        httpx.post(f"{stack.orchestrator_url}/v1/jobs", json=body, headers=AUTH, timeout=30).status_code
        == 422
    )


def _script(stack: LocalStack, name: str, *args: str) -> str:
    env = {**os.environ, "EDGEORCH_URL": stack.orchestrator_url, "EDGEORCH_MONITOR_URL": stack.monitor_url,
           "EDGEORCH_WORKER_URL": stack.workers[0].url, "EDGEORCH_ADMIN_TOKEN": stack.admin_token,
           "EDGEORCH_API_KEY": KEY_A}  # fmt: skip
    result = subprocess.run([str(REPO / "scripts" / name), *args], env=env, capture_output=True,
                            text=True, timeout=180, check=False)  # fmt: skip
    assert result.returncode == 0, f"{name}: {result.stdout}\n{result.stderr}"
    return result.stdout


def test_the_jobs_scripts(stack) -> None:
    accepted = json.loads(_script(stack, "jobs-submit.sh", "tiny", PROMPTS[0]))
    job = json.loads(_script(stack, "jobs-poll.sh", accepted["id"]))
    assert job["state"] == "succeeded", job
    assert job["results"][0]["text"] == _complete(stack, PROMPTS[0], max_tokens=16)  # the script's


def test_the_read_only_scripts(stack) -> None:
    assert "tiny" in {m["id"] for m in json.loads(_script(stack, "models.sh"))["data"]}
    assert json.loads(_script(stack, "deployments-get.sh", "tiny"))["state"] == "ready"
    assert "tiny" in {d["name"] for d in json.loads(_script(stack, "deployments-list.sh"))}
    assert json.loads(_script(stack, "completions.sh", "tiny", PROMPTS[0], "8"))["choices"][0]["text"] == (
        _complete(stack, PROMPTS[0])
    )
    assert isinstance(json.loads(_script(stack, "events.sh")), list)
    nodes = json.loads(_script(stack, "monitor-nodes.sh", "tiny-llama"))
    assert {n["node_id"] for n in nodes} == {"node-a", "node-b"}
    assert isinstance(json.loads(_script(stack, "monitor-links.sh")), list)


def test_the_emulation_script_changes_a_worker(stack) -> None:
    out = _script(stack, "worker-emulation.sh", "1.5").strip().splitlines()
    assert json.loads(out[-1])["slowdown"] == 1.5
    _script(stack, "worker-emulation.sh", "1.0")  # node-a back to its scenario speed
