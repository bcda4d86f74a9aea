"""schemathesis against all five services of a live local stack: no 5xx, and every 4xx says why.

One stack (two workers, a ready tiny-llama deployment, the admin token on
every call, so the guarded routes are fuzzed too); schemathesis runs its
examples, coverage (boundary values: the longest strings, the largest
integers) and fuzzing phases on every operation of each service's OpenAPI
schema, with a fixed seed, so a failure reproduces. The gateway's
``max_tokens`` limit is lowered for the run: fuzzing is about what the
services accept, and long generations would only spend CI time.

Checks: ``not_a_server_error`` (no 5xx) and ``client_error_has_detail``
(tests/fuzz/checks.py). Example counts are sized for ~2-3 minutes on the
2-core CI machine.
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from edgeorch.local.stack import LocalStack
from edgeorch.local.up_command import calibrate, create_deployment, wait_ready
from tests.support import REPO

TOKEN = "fuzz-admin-token"
SEED = 18
# Examples per operation for the fuzzing phase; the coverage phase adds its boundary cases.
EXAMPLES = {"orchestrator": 6, "monitor": 10, "splitter": 10, "broadcast": 10, "worker": 10}


@pytest.fixture(scope="module")
def stack(store, tmp_path_factory):
    with LocalStack(
        workers=2, model_store=store.root, log_dir=tmp_path_factory.mktemp("logs"), admin_token=TOKEN,
        service_env={"EDGEORCH_MAX_TOKENS_LIMIT": "8"}, jobs_worker=False, start_timeout_s=180,
    ) as s:  # fmt: skip
        with httpx.Client(timeout=60) as client:
            calibrate(client, s.monitor_url, TOKEN, "tiny-llama", [w.name for w in s.workers], 120)
            create_deployment(client, s.orchestrator_url, TOKEN, "fuzzed", "tiny-llama")
            wait_ready(client, s.orchestrator_url, "fuzzed", 180, s.log_dir)
        yield s


def _urls(stack: LocalStack) -> dict[str, str]:
    return {"orchestrator": stack.orchestrator_url, "monitor": stack.monitor_url,
            "splitter": stack.splitter_url, "broadcast": stack.broadcast_url, "worker": stack.workers[0].url}  # fmt: skip


def test_a_prompt_past_the_model_context_is_a_400_not_a_long_run(stack) -> None:
    # Before the fuzzing: with the admin token, the fuzzer may delete the deployment.
    body = {"model": "fuzzed", "prompt": "edge " * 1500, "max_tokens": 4}  # tiny-llama reads 1024 positions
    resp = httpx.post(f"{stack.orchestrator_url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)  # fmt: skip
    assert resp.status_code == 400, resp.text
    assert "1024" in resp.json()["detail"] and resp.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize("service", list(EXAMPLES))
def test_no_server_error_and_every_refusal_has_a_detail(stack, service: str, tmp_path) -> None:
    url = _urls(stack)[service]
    argv = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json",
        "--checks", "not_a_server_error,client_error_has_detail",
        "--phases", "examples,coverage,fuzzing", "--max-examples", str(EXAMPLES[service]),
        "--seed", str(SEED), "--generation-database", "none", "--no-shrink",
        "--header", f"Authorization: Bearer {TOKEN}", "--request-timeout", "30", "--workers", "1",
        "--no-color", "--report", "junit", "--report-dir", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz.checks", "PYTHONPATH": str(REPO)}
    # Run in tmp_path: schemathesis keeps a cache folder (.schemathesis/) in its working directory.
    result = subprocess.run(
        argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400, check=False
    )
    summary = result.stdout[-6000:]
    assert result.returncode == 0, (
        f"schemathesis found failures on {service}:\n{summary}\n{result.stderr[-2000:]}"
    )
    assert " passed" in result.stdout and "generated" in result.stdout, summary
