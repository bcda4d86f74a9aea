"""The admin token on real processes: worker, broadcast and monitor started with EDGEORCH_ADMIN_TOKEN.

Calls that change the system answer 401 without the token or with a wrong one,
and change nothing; with it they work. The data path (forward steps, session
releases) needs a stage's credential instead (test_stage_credentials.py); worker
registration and heartbeats, signed acks and desired states stay open, so a
rollout still goes through end to end. Without a token the
services refuse to listen beyond loopback.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import time

import httpx
import psutil
import pytest

from edgeorch.local.launcher import CLI, LocalService, LocalWorkers, free_port
from edgeorch.rollout.signing import SIGNATURE_HEADER, sign_bytes
from edgeorch.service.auth import admin_headers
from tests.integration.rollout_helpers import (
    BROADCAST_KNOBS,
    REDIS_URL,
    generate,
    held,
    unique,
    wait_for,
    with_credential,
    worker_env,
)
from tests.support import ServiceProcess

TINY = "tiny-llama"  # 6 units
TOKEN = secrets.token_hex(16)
RIGHT = admin_headers(TOKEN)
WRONG = admin_headers("not-the-token")
SPEC = {"model": TINY, "start": 0, "end": 6, "next": None}
BEAT = {"cpu_percent": 1.0, "memory_free_bytes": 1, "queue_depth": 0, "sessions": 0}


@pytest.fixture(scope="module")
def guarded(store, tmp_path_factory):
    """A broadcast process and two workers following it, all with the admin token."""
    logs = tmp_path_factory.mktemp("auth")
    secret = secrets.token_hex(16)
    env = {
        "EDGEORCH_DATABASE_URL": f"sqlite:///{logs / 'broadcast.db'}",
        "EDGEORCH_REDIS_URL": REDIS_URL,
        "EDGEORCH_ROLLOUT_SECRET": secret,
        "EDGEORCH_ADMIN_TOKEN": TOKEN,
        **BROADCAST_KNOBS,
    }
    bc = ServiceProcess(["broadcast"], free_port(), env, logs / "broadcast.log")
    try:
        bc.wait_ready()
        workers = LocalWorkers(2, threads=1, log_dir=logs,
                               extra_env=worker_env(bc.url, secret, EDGEORCH_ADMIN_TOKEN=TOKEN))  # fmt: skip
    except BaseException:
        bc.kill()
        raise
    try:
        yield bc, workers, secret
    finally:
        workers.stop()
        bc.kill()


def _refused(resp: httpx.Response) -> bool:
    return (
        resp.status_code == 401
        and resp.headers.get("www-authenticate") == "Bearer"
        and "EDGEORCH_ADMIN_TOKEN" in resp.json()["detail"]
    )


def _stage_ids(worker: LocalService) -> set[str]:
    return {s["stage_id"] for s in httpx.get(f"{worker.url}/v1/stages", timeout=30).json()}


def test_worker_stage_calls_need_the_token(guarded) -> None:
    _, workers, _ = guarded
    w = workers.workers[0]
    url = f"{w.url}/v1/stages/auth.s0"
    assert _refused(httpx.put(url, json=SPEC, timeout=30))
    assert _refused(httpx.put(url, json=SPEC, headers=WRONG, timeout=30))
    assert _refused(httpx.put(url, json={"model": "garbage"}, timeout=30))  # refused before it is read
    assert "auth.s0" not in _stage_ids(w)
    assert httpx.put(url, json=SPEC, headers=RIGHT, timeout=300).status_code == 201
    # Reads stay open, and so does the data path of a stage loaded without a credential.
    assert httpx.get(url, timeout=30).json()["param_bytes"] > 0
    assert len(generate({"url": w.url, "stage_id": "auth.s0"}, [1, 50, 60], 4)) == 4

    assert _refused(httpx.delete(url, timeout=30))
    assert _refused(httpx.delete(url, headers=WRONG, timeout=30))
    assert "auth.s0" in _stage_ids(w)
    assert httpx.delete(url, headers=RIGHT, timeout=30).json() == {"deleted": "auth.s0"}
    assert "auth.s0" not in _stage_ids(w)


def test_worker_emulation_changes_need_the_token(guarded) -> None:
    _, workers, _ = guarded
    admin = f"{workers.workers[1].url}/v1/admin/emulation"
    before = httpx.get(admin, timeout=30).json()
    assert before["slowdown"] == 1.0
    change = {"slowdown": 3.0, "bandwidth_mbps": 50, "rtt_ms": 4}
    assert _refused(httpx.post(admin, json=change, timeout=30))
    assert _refused(httpx.post(admin, json=change, headers=WRONG, timeout=30))
    assert httpx.get(admin, timeout=30).json() == before
    assert httpx.post(admin, json=change, headers=RIGHT, timeout=30).json()["slowdown"] == 3.0
    assert httpx.get(admin, timeout=30).json()["slowdown"] == 3.0
    httpx.post(admin, json=before, headers=RIGHT, timeout=30).raise_for_status()


def test_starting_a_rollout_needs_the_token_and_the_workers_follow_without_it(guarded) -> None:
    bc, workers, secret = guarded
    a, b = workers.workers
    name = unique("auth")
    plan = {"model": TINY, "stages": [{"node": a.name, "url": a.url, "start": 0, "end": 3},
                                      {"node": b.name, "url": b.url, "start": 3, "end": 6}]}  # fmt: skip
    body = {"deployment": name, "plan": plan}
    assert _refused(httpx.post(f"{bc.url}/v1/rollouts", json=body, timeout=30))
    assert _refused(httpx.post(f"{bc.url}/v1/rollouts", json=body, headers=WRONG, timeout=30))
    assert httpx.get(f"{bc.url}/v1/rollouts", params={"deployment": name}, timeout=30).json() == []
    assert httpx.get(f"{bc.url}/v1/deployments/{name}", timeout=30).status_code == 404

    started = httpx.post(f"{bc.url}/v1/rollouts", json=body, headers=RIGHT, timeout=30)
    assert started.status_code == 201, started.text
    rid = started.json()["id"]
    # The workers load, ack (signed, no admin token) and pull desired state on their own.
    done = wait_for(
        lambda: (v := httpx.get(f"{bc.url}/v1/rollouts/{rid}", timeout=30).json())["phase"]
        in ("completed", "aborted") and v,
        90, f"rollout {rid} finishing\n{bc.log_tail()}",
    )  # fmt: skip
    assert done["phase"] == "completed", done
    assert held(a, name) == {f"{name}.v1.s0"} and held(b, name) == {f"{name}.v1.s1"}
    entry = with_credential(httpx.get(f"{bc.url}/v1/deployments/{name}", timeout=30).json(), secret)["entry"]
    assert len(generate(entry, [1, 50, 60], 4)) == 4
    assert httpx.get(f"{bc.url}/v1/nodes/{a.name}/desired", timeout=30).status_code == 200

    # An ack is judged by its HMAC, not the admin token: a signed one for an unknown rollout is a 404.
    raw = json.dumps({"rollout_id": "nope", "node_id": a.name, "ok": True}).encode()
    ack = httpx.post(f"{bc.url}/v1/rollouts/nope/acks", content=raw, timeout=30, headers={
        SIGNATURE_HEADER: sign_bytes(raw, secret), "content-type": "application/json"})  # fmt: skip
    assert ack.status_code == 404, ack.text


def test_monitor_profile_requests_need_the_token_registration_does_not(tmp_path) -> None:
    env = {
        "EDGEORCH_DATABASE_URL": f"sqlite:///{tmp_path / 'monitor.db'}",
        "EDGEORCH_REDIS_URL": REDIS_URL,
        "EDGEORCH_ADMIN_TOKEN": TOKEN,
    }
    mon = LocalService("monitor", ["monitor"], free_port(), env, tmp_path)
    try:
        mon.wait_healthy()
        reg = {"node_id": "n1", "url": "http://127.0.0.1:9", "capacity": {"cores": 1, "memory_bytes": 1}}
        assert httpx.post(f"{mon.url}/v1/nodes", json=reg, timeout=30).status_code == 200
        assert httpx.post(f"{mon.url}/v1/nodes/n1/heartbeat", json=BEAT, timeout=30).status_code == 200
        profiles = f"{mon.url}/v1/profiles"
        assert _refused(httpx.post(profiles, json={"model": TINY}, timeout=30))
        assert _refused(httpx.post(profiles, json={"model": TINY}, headers=WRONG, timeout=30))
        assert httpx.get(profiles, timeout=30).json()["models"] == []
        assert httpx.post(profiles, json={"model": TINY}, headers=RIGHT, timeout=30).status_code == 202
        assert httpx.get(profiles, timeout=30).json()["models"] == [TINY]
    finally:
        mon.stop()


def _cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EDGEORCH_BROADCAST_URL", "EDGEORCH_MONITOR_URL")}
    return {**env, "EDGEORCH_ADMIN_TOKEN": "", "EDGEORCH_ROLLOUT_SECRET": "", **extra}


@pytest.mark.parametrize("service", ["worker", "monitor", "broadcast"])
def test_services_refuse_to_listen_beyond_loopback_without_a_token(service: str, tmp_path) -> None:
    done = subprocess.run(
        [*CLI, service, "--host", "0.0.0.0", "--port", str(free_port())],
        env=_cli_env(EDGEORCH_STATE_DIR=str(tmp_path)), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"EDGEORCH_ADMIN_TOKEN is empty but {service} would listen on '0.0.0.0'" in done.stderr


def _own_addresses() -> list[str]:
    """This machine's IPv4 addresses outside 127.0.0.0/8 (none on a loopback-only sandbox)."""
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")]  # fmt: skip


def _healthy(proc: subprocess.Popen, url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def test_a_worker_with_a_token_may_listen_on_every_address(tmp_path) -> None:
    port = free_port()
    with open(tmp_path / "worker.log", "wb") as log:
        proc = subprocess.Popen(
            [*CLI, "worker", "--host", "0.0.0.0", "--port", str(port)],
            env=_cli_env(EDGEORCH_ADMIN_TOKEN=TOKEN), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        assert _healthy(proc, f"http://127.0.0.1:{port}", 60), (tmp_path / "worker.log").read_text()
        # Every address, not only loopback: 127.0.0.2 reaches a socket bound to 0.0.0.0 but not
        # one bound to 127.0.0.1, and so does each of this machine's own non-loopback addresses.
        addresses = ["127.0.0.2", *_own_addresses()]
        for address in addresses:
            emulation = f"http://{address}:{port}/v1/admin/emulation"
            assert _refused(httpx.post(emulation, json={"slowdown": 2.0}, timeout=30)), address
            assert httpx.get(f"http://{address}:{port}/healthz", timeout=30).status_code == 200, address
    finally:
        proc.terminate()
        proc.wait(timeout=30)
