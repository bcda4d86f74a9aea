"""What the compose end-to-end tests share: the published ports, docker-compose calls, bring-up and teardown.

The published ports are free ones, chosen here (EDGEORCH_GATEWAY_PORT and
friends, which `make compose-up` leaves at 8000-8003): a stack of `edgeorch up`
may hold those on the same machine. Both test modules (plain and TLS) bring up
one stack at a time on these ports, the second after the first is down.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeorch.local.launcher import free_port
from tests.support import REPO

MODEL = "smollm2-135m"
WORKERS = ("worker-a", "worker-b", "worker-c")
PORTS = {name: free_port() for name in ("GATEWAY", "MONITOR", "SPLITTER", "BROADCAST")}


def engine_missing() -> str | None:
    """Why no Docker engine and docker-compose can be used here; None when they can."""
    for exe in ("docker", "docker-compose"):
        if shutil.which(exe) is None:
            return f"{exe} is not on PATH"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60, check=False)
    return None if info.returncode == 0 else f"no Docker engine answers: {info.stderr.strip()[-200:]}"


def env() -> dict[str, str]:
    """This process's environment with the stack's published ports."""
    return {**os.environ, **{f"EDGEORCH_{name}_PORT": str(port) for name, port in PORTS.items()}}


def compose(*args: str, timeout: float = 120) -> str:
    """A docker-compose call in the repository (it reads .env, COMPOSE_FILE included); its stdout."""
    out = subprocess.run(["docker-compose", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=timeout, check=True, env=env())  # fmt: skip
    return out.stdout


def container_sh(*args: str, check: bool, timeout: float = 300) -> subprocess.CompletedProcess:
    """deploy/container.sh up [--tls] | down, as `make compose-up` / `make compose-down` run it."""
    return subprocess.run([str(REPO / "deploy" / "container.sh"), *args], cwd=REPO, timeout=timeout,
                          check=check, env=env())  # fmt: skip


def container(service: str) -> str:
    """The id of a service's container."""
    return compose("ps", "-q", service).strip()


def save_logs(project: str) -> None:
    """Every service's log into a file before the stack goes (for a failure's post-mortem)."""
    if not compose("ps", "-q").strip():
        return
    logs = Path(tempfile.gettempdir()) / f"edgeorch-compose-{project}.log"
    with logs.open("w", encoding="utf-8") as f:
        subprocess.run(["docker-compose", "logs", "--no-color", "--timestamps"], cwd=REPO, stdout=f,
                       stderr=subprocess.STDOUT, timeout=120, check=False, env=env())  # fmt: skip
    print(f"compose logs in {logs}")


def running_stack(*up_args: str) -> Iterator[str]:
    """A module fixture's body: `deploy/container.sh up *up_args`, yield the compose project, then down.

    Skips without a Docker engine, fails instead when EDGEORCH_COMPOSE_REQUIRED is set.
    """
    missing = engine_missing()
    if missing:
        if os.environ.get("EDGEORCH_COMPOSE_REQUIRED"):
            pytest.fail(f"compose e2e required but {missing}", pytrace=False)
        pytest.skip(missing)
    t0 = time.monotonic()
    up = container_sh("up", *up_args, timeout=1800, check=False)
    print(f"compose-up {' '.join(up_args)} took {time.monotonic() - t0:.0f} s")
    if up.returncode != 0:
        save_logs("failed-up")
        container_sh("down", check=False)
        pytest.fail(f"deploy/container.sh up {' '.join(up_args)} exited {up.returncode}", pytrace=False)
    project = subprocess.run(["docker", "inspect", "-f", '{{index .Config.Labels "com.docker.compose.project"}}',
                              container("orchestrator")], capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    yield project
    save_logs(project)
    container_sh("down", check=False)


def leftovers(project: str) -> tuple[str, str]:
    """The project's containers and networks still there (ids, one per line)."""
    label = f"label=com.docker.compose.project={project}"
    ps = subprocess.run(
        ["docker", "ps", "-aq", "--filter", label], capture_output=True, text=True, check=True
    )
    nets = subprocess.run(["docker", "network", "ls", "-q", "--filter", label], capture_output=True, text=True,
                          check=True)  # fmt: skip
    return ps.stdout.strip(), nets.stdout.strip()
