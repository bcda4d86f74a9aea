"""The compose stack for real: `make compose-up` on this machine's Docker engine, then chat, kill, down.

Marker ``compose`` (``make test-compose``; ``make test`` leaves it out). Needs a
running Docker engine and docker-compose: skipped without one, failed instead
when EDGEORCH_COMPOSE_REQUIRED is set (.ci/run sets it once it has started
dockerd). The stack is built and started by deploy/container.sh exactly as
`make compose-up` does; the model answers from inside the containers and is
compared with the unsplit model computed here from the host's model store.

The published ports are free ones (tests/e2e/compose_support.py).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time

import httpx
import pytest
from openai import OpenAI

from tests.e2e.compose_support import (
    MODEL,
    PORTS,
    WORKERS,
    container,
    container_sh,
    leftovers,
    running_stack,
    save_logs,
)
from tests.reference import greedy_chat_answers
from tests.support import wait_for

pytestmark = [pytest.mark.compose, pytest.mark.slow]
GATEWAY = f"http://127.0.0.1:{PORTS['GATEWAY']}"
MONITOR = f"http://127.0.0.1:{PORTS['MONITOR']}"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
HAIKU = [{"role": "user", "content": "Write a haiku about the sea."}]


@pytest.fixture(scope="module")
def stack():
    """`deploy/container.sh up` (build, .env, up, deploy step); the project name for the final check."""
    yield from running_stack()


@pytest.fixture(scope="module")
def expected(store) -> dict[str, str]:
    """The unsplit model's greedy answers, computed here in float32 from the host's store."""
    return greedy_chat_answers(store.path(MODEL), {"capital": (CAPITAL, 32), "haiku": (HAIKU, 64)})


def _client() -> OpenAI:
    # The gateway is open unless EDGEORCH_API_KEYS is set; the client insists on some key.
    return OpenAI(
        base_url=f"{GATEWAY}/v1", api_key=os.environ.get("EDGEORCH_TEST_API_KEY", "none"), timeout=120
    )


def _deployment() -> dict:
    return httpx.get(f"{GATEWAY}/v1/deployments/{MODEL}", timeout=30).json()


def test_chat_through_compose_equals_the_unsplit_model(stack, expected) -> None:
    d = _deployment()
    assert d["state"] == "ready", d
    out = _client().chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=32)
    assert out.choices[0].message.content == expected["capital"] == "The capital of France is Paris."


def test_cpu_limits_are_real_and_the_calibration_sees_them(stack) -> None:
    quota = {}
    for w in WORKERS:
        out = subprocess.run(["docker", "inspect", "-f", "{{.HostConfig.CpuQuota}}/{{.HostConfig.CpuPeriod}}",
                              container(w)], capture_output=True, text=True, check=True).stdout  # fmt: skip
        quota[w] = out.strip()
    assert quota == {"worker-a": "2000/2000", "worker-b": "1000/2000", "worker-c": "2000/2000"}, quota
    # The monitor's speed per node (live probes, rolling median), read ten times a second apart:
    # other work on the machine moves single readings.
    ratios = []
    for _ in range(10):
        views = httpx.get(f"{MONITOR}/v1/nodes", params={"model": MODEL}, timeout=30).json()
        flops = {v["node_id"]: v["flops_per_s"] for v in views if v["node_id"] in WORKERS}
        ratios.append((flops["worker-a"] + flops["worker-c"]) / 2 / flops["worker-b"])
        time.sleep(1.0)
    ratio = statistics.median(ratios)
    print(f"flop/s {flops}; one core / half a core: median {ratio:.2f} of {[round(r, 2) for r in ratios]}")
    # Half the CPU: about 2x slower when the three probe one at a time. When they probe at once,
    # one core and one core and half a core want 2.5 of this machine's 2 cores: the half-core
    # worker keeps its 0.5 and the other two share 1.5, a ratio of 1.5, lower still with the
    # rest of the stack busy (CI read 1.88, 1.34, 1.49 and 1.34 in four runs on one day). An unlimited
    # worker-b reads about 1.
    assert 1.2 <= ratio <= 2.6, ratios
    units = dict.fromkeys(WORKERS, 0)
    for s in _deployment()["stages"]:
        units[s["node"]] += s["end"] - s["start"]
    print(f"units per worker: {units}")
    assert units["worker-b"] < min(units["worker-a"], units["worker-c"]), units


def _docker_kill(container: str) -> None:
    """SIGKILL a container through the engine's API socket: milliseconds, where the `docker kill`
    command took 1.3-1.8 s on a busy machine and could land after the stream had ended."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        subprocess.run(["docker", "kill", container], check=True, capture_output=True, timeout=60)
        return
    with httpx.Client(transport=httpx.HTTPTransport(uds=host.removeprefix("unix://")), timeout=60) as docker:
        docker.post(f"http://docker/containers/{container}/kill").raise_for_status()


def test_a_worker_container_killed_mid_stream(stack, expected) -> None:
    d = wait_for(lambda: (v := _deployment())["state"] == "ready" and v, 60, "ready")
    victim = d["stages"][1]["node"] if len(d["stages"]) > 1 else d["stages"][0]["node"]
    victim_id = container(victim)  # resolved before the stream: `docker-compose ps` takes seconds
    since = httpx.get(f"{GATEWAY}/v1/events", timeout=30).json()[-1]["id"]
    stream = _client().chat.completions.create(model=MODEL, messages=HAIKU, temperature=0, max_tokens=64,
                                               stream=True)  # fmt: skip
    # The kill runs beside the stream, not in its loop, so unread tokens never wait for it.
    killed_at: list[float] = []
    killer = threading.Thread(target=lambda: (_docker_kill(victim_id), killed_at.append(time.monotonic())))
    text, stamps = "", []
    for chunk in stream:
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta:
            text += delta
            stamps.append(time.monotonic())
            if len(stamps) == 10:
                killer.start()
    killer.join()
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    print(f"killed {victim}'s container {killed_at[0] - stamps[9]:.3f}s after the 10th token, "
          f"{stamps[-1] - killed_at[0]:.2f}s before the last; longest gap {max(gaps):.2f}s, "
          f"median {statistics.median(gaps):.3f}s")  # fmt: skip
    assert subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", victim_id],
                          capture_output=True, text=True, check=True).stdout.strip() == "false"  # fmt: skip
    assert text == expected["haiku"]
    # The kill must have landed mid-stream and the stream must have been carried over:
    # otherwise the gap below measures nothing.
    assert killed_at[0] < stamps[-1], "the stream ended before the kill: nothing was recovered"
    recover = wait_for(lambda: next((e for e in httpx.get(f"{GATEWAY}/v1/events", params={"since": since},
                                                          timeout=30).json() if e["kind"] == "recover"), None),
                       60, "a recover event")  # fmt: skip
    print(
        "re-route:",
        {k: recover["data"].get(k) for k in ("plan_s", "prepare_s", "load_s", "commit_s", "took_s")},
    )
    assert max(gaps) <= 2.0
    after = wait_for(lambda: (v := _deployment())["state"] == "ready" and v, 60, "ready again")
    assert victim not in {s["node"] for s in after["stages"]}


def test_compose_down_leaves_no_container(stack) -> None:
    save_logs(stack)
    container_sh("down", check=True)
    assert leftovers(stack) == ("", "")
