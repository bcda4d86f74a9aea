"""The local stack as real processes: start, what each service is told, nodes joining and dying, stop.

One stack for the module (starting one costs ~30 s of a 2-core machine): two
scenario workers, a configured Redis URL that nothing answers (so the stack
must start its own), the orchestrator and the jobs worker. The deployment and
the jobs API are exercised in tests/e2e/test_jobs.py.
"""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest

from edgeorch.local.launcher import CLI, free_port, redis_answers
from edgeorch.local.stack import LocalStack
from tests.integration.rollout_helpers import wait_for
from tests.support import REPO


def _edgeorch(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False,
    )  # fmt: skip


def test_up_help_lists_its_flags() -> None:
    result = _edgeorch("up", "--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--workers", "--scenario", "--model", "--once", "--log-dir", "--threads", "--timeout"):
        assert flag in result.stdout, flag


def test_jobs_worker_help() -> None:
    result = _edgeorch("jobs-worker", "--help")
    assert result.returncode == 0, result.stderr
    assert "--concurrency" in result.stdout


def test_up_with_a_missing_scenario_fails_clearly_and_starts_nothing(store, tmp_path) -> None:
    result = _edgeorch("up", "--once", "--scenario", str(tmp_path / "nope.yaml"), "--log-dir", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cannot read scenario" in result.stderr and "nope.yaml" in result.stderr
    assert not list(tmp_path.glob("*.log"))


@pytest.fixture(scope="module")
def synth_store(store, tmp_path_factory):
    """A store holding only a synthesised test-tiny model in int8 (and SmolLM2, whose tokenizer it uses)."""
    from edgeorch.engine.synth import synth_model
    from edgeorch.models.store import ModelStore

    s = ModelStore(tmp_path_factory.mktemp("synth-store"))
    s.root.mkdir(parents=True, exist_ok=True)
    (s.root / "smollm2-135m").symlink_to(store.path("smollm2-135m"))
    synth_model(s, "tt", "test-tiny", "int8")
    return s


def test_up_refuses_a_format_a_synthesised_model_was_not_written_in(synth_store, tmp_path) -> None:
    result = _edgeorch("up", "--once", "--model", "tt", "--format", "fp32", "--store", str(synth_store.root),
                       "--log-dir", str(tmp_path))  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "can be served in ['int8'], not 'fp32'" in result.stderr
    assert not list(tmp_path.glob("*.log"))  # refused before anything started


def test_up_deploys_a_synthesised_model_and_it_answers(synth_store, tmp_path) -> None:
    # The model exists only as packed int8 unit files: calibration, planning and the
    # stage loads must all take them (there is no checkpoint to fall back on).
    private = (
        ["--private-redis"] if shutil.which("redis-server") else []
    )  # other stacks' node events stay out
    result = _edgeorch("up", "--once", "--model", "tt", "--workers", "2", "--store", str(synth_store.root),
                       "--log-dir", str(tmp_path), *private, timeout_s=400)  # fmt: skip
    assert result.returncode == 0, (
        result.stdout + result.stderr + "".join(p.read_text()[-3000:] for p in tmp_path.glob("node-*.log"))
    )
    assert "creating deployment tt (int8)" in result.stdout
    answer = next(line for line in result.stdout.splitlines() if line.startswith("answer ("))
    assert len(answer.split(": ", 1)[1].strip()) > 0  # random weights: any text, but some text


@pytest.fixture(scope="module")
def stack(store, tmp_path_factory):
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    with LocalStack(
        workers=2, model_store=store.root, log_dir=tmp_path_factory.mktemp("logs"),
        redis_url=dead_redis, start_timeout_s=180,
    ) as s:  # fmt: skip
        s.configured_redis = dead_redis
        yield s


def _nodes(stack: LocalStack) -> dict[str, dict]:
    return {n["node_id"]: n for n in httpx.get(f"{stack.monitor_url}/v1/nodes", timeout=10).json()}


def test_a_private_redis_is_started_when_none_answers(stack) -> None:
    assert stack.redis_server is not None
    assert stack.redis_url != stack.configured_redis
    assert redis_answers(stack.redis_url)


def test_every_service_answers_and_logs_to_its_own_file(stack) -> None:
    for url in (stack.orchestrator_url, stack.monitor_url, stack.splitter_url, stack.broadcast_url):
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200, url
    logs = {p.name for p in stack.log_dir.glob("*.log")}
    expected = {
        "redis",
        "monitor",
        "splitter",
        "broadcast",
        "orchestrator",
        "jobs-worker",
        "node-a",
        "node-b",
    }
    assert logs == {f"{name}.log" for name in expected}
    assert [name for name, _, _ in stack.listing()][:4] == ["redis", "monitor", "splitter", "broadcast"]


def test_admin_calls_need_the_stack_token(stack) -> None:
    body = {"name": "nope", "model": "tiny-llama"}
    refused = httpx.post(f"{stack.orchestrator_url}/v1/deployments", json=body, timeout=10)
    assert refused.status_code == 401
    worker = stack.workers[0].url
    assert httpx.post(f"{worker}/v1/admin/emulation", json={"slowdown": 2.0}, timeout=10).status_code == 401


def test_workers_report_the_scenario_capacity(stack) -> None:
    nodes = wait_for(
        lambda: (n := _nodes(stack)) and {"node-a", "node-b"} <= set(n) and n, 60, "registration"
    )
    a, b = nodes["node-a"], nodes["node-b"]
    assert a["memory_bytes"] == 320 * 2**20 and a["trusted"] and a["watts"] == 15
    assert b["memory_bytes"] == 512 * 2**20 and not b["trusted"] and b["watts"] == 6
    assert a["url"] == stack.worker("node-a").url
    emulation = httpx.get(f"{stack.worker('node-b').url}/v1/admin/emulation", timeout=10).json()
    assert emulation["slowdown"] == 2.0


def test_a_node_joins_and_another_dies(stack) -> None:
    joined = stack.add_worker("node-x", slowdown=3.0, memory="128MiB")
    assert joined.name == "node-x" and joined in stack.workers
    nodes = wait_for(lambda: (n := _nodes(stack)).get("node-x") and n, 60, "node-x registered")
    assert nodes["node-x"]["memory_bytes"] == 128 * 2**20
    victim = stack.worker("node-b")
    stack.kill_worker("node-b")
    assert victim.proc.returncode == -9 and victim not in stack.workers
    wait_for(lambda: _nodes(stack)["node-b"]["state"] == "lost", 30, "node-b lost")
    with pytest.raises(KeyError):
        stack.worker("node-b")


def test_stop_ends_every_process_and_frees_every_port(stack) -> None:
    processes = [stack.redis_server, *stack.services.values(), *stack.workers]
    urls = [stack.orchestrator_url, stack.monitor_url, *(w.url for w in stack.workers)]
    started = time.monotonic()
    stack.stop()
    assert time.monotonic() - started < 60
    assert all(p.proc.poll() is not None for p in processes)
    for url in urls:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=2)
    assert not redis_answers(stack.redis_url)
    stack.stop()  # twice is harmless
