"""Spot checks of untrusted nodes on a live stack: honest nodes pass, a tampering node is found and planned around.

Three workers: node-t is trusted, node-u1 and node-u2 are not, and the
deployment may use only the untrusted two, so every stage is checked. The
orchestrator checks every step here (share 1.0: the test wants a verdict at
once; the benchmark runs the default 2 %), and holds whole answers until
a check begun after their last step passed. Honest nodes: checks run and pass,
bit for bit (fp32). Then a node of the route perturbs its outputs (the
worker's admin-only emulation switch): a check fails, an event names the
node, the deployment is re-planned without it, and the answers after that
equal the honest ones.
"""

from __future__ import annotations

import time

import httpx
import pytest

from edgeorch.local.scenario import Scenario, WorkerSpec
from edgeorch.local.stack import LocalStack
from edgeorch.local.up_command import calibrate, wait_ready

TOKEN = "spot-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPTS = ["The capital of France is", "Edge devices are", "One, two, three,"]


@pytest.fixture(scope="module")
def stack(store, tmp_path_factory):
    scenario = Scenario(workers=[WorkerSpec(id="node-t", trusted=True), WorkerSpec(id="node-u1"),
                                 WorkerSpec(id="node-u2")])  # fmt: skip
    with LocalStack(
        scenario, model_store=store.root, log_dir=tmp_path_factory.mktemp("logs"), admin_token=TOKEN,
        jobs_worker=False, start_timeout_s=180, service_env={"EDGEORCH_SPOT_CHECK_SHARE": "1.0", "EDGEORCH_SPOT_CHECK_HOLD_S": "2"},
    ) as s:  # fmt: skip
        with httpx.Client(timeout=120) as client:
            calibrate(client, s.monitor_url, TOKEN, "tiny-llama", [w.name for w in s.workers], 120)
            resp = client.post(f"{s.orchestrator_url}/v1/deployments", headers=AUTH, json={
                "name": "checked", "model": "tiny-llama", "policy": {"nodes": ["node-u1", "node-u2"]}})  # fmt: skip
            assert resp.status_code == 201, resp.text
            wait_ready(client, s.orchestrator_url, "checked", 180, s.log_dir)
        yield s


def _answer(client: httpx.Client, url: str, prompt: str) -> str:
    body = {"model": "checked", "prompt": prompt, "max_tokens": 6, "temperature": 0}
    resp = client.post(f"{url}/v1/completions", json=body, headers=AUTH)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def _checks(client: httpx.Client, url: str) -> dict:
    return client.get(f"{url}/v1/spot-checks").json()


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"not within {timeout_s:.0f} s: {what}")


def test_honest_nodes_pass_bit_exact_then_a_tampering_node_is_found_and_planned_around(stack) -> None:
    url = stack.orchestrator_url
    with httpx.Client(timeout=120) as client:
        honest = {p: _answer(client, url, p) for p in PROMPTS}
        state = _wait(lambda: (s := _checks(client, url))["counts"].get("checked", 0) >= 3 and s,
                      120, "three spot checks on honest nodes")  # fmt: skip
        assert state["enabled"] and state["counts"]["failed"] == 0 and not state["suspects"], state
        assert all(v["ok"] and v["detail"] == "bit-exact" and v["max_diff"] == 0.0 for v in state["recent"])
        assert {n for v in state["recent"] for n in v["nodes"]} <= {"node-u1", "node-u2"}

        view = client.get(f"{url}/v1/deployments/checked").json()
        tamperer = view["stages"][0]["node"]
        worker = stack.worker(tamperer)
        resp = client.post(f"{worker.url}/v1/admin/emulation", json={"perturb": 0.5})
        assert resp.status_code in (401, 403), "the emulation switch is admin-only"
        resp = client.post(f"{worker.url}/v1/admin/emulation", json={"perturb": 0.5}, headers=AUTH)
        assert resp.status_code == 200, resp.text
        t0 = time.monotonic()

        def found() -> dict | None:
            try:  # answers may be refused (503) while the re-plan runs; what matters is the verdict
                _answer(client, url, PROMPTS[0])
            except AssertionError:
                pass
            events = client.get(f"{url}/v1/events", params={"deployment": "checked"}).json()
            return next((e for e in events if e["kind"] == "spot_check_failed"), None)

        event = _wait(found, 120, f"a failed spot check of {tamperer}")
        detected_s = time.monotonic() - t0
        assert event["data"]["nodes"] == [tamperer] and tamperer in event["message"], event
        assert tamperer in _checks(client, url)["suspects"]

        def replanned() -> dict | None:
            v = client.get(f"{url}/v1/deployments/checked").json()
            return v if v["state"] == "ready" and all(s["node"] != tamperer for s in v["stages"]) else None

        _wait(replanned, 120, f"a plan without {tamperer}")
        for p in PROMPTS:
            assert _answer(client, url, p) == honest[p]
        # Being alive proves nothing: the suspect stays out until an operator says otherwise.
        assert client.delete(f"{url}/v1/spot-checks/suspects/{tamperer}").status_code in (401, 403)
        assert client.delete(f"{url}/v1/spot-checks/suspects/{tamperer}", headers=AUTH).status_code == 204
        assert client.delete(f"{url}/v1/spot-checks/suspects/{tamperer}", headers=AUTH).status_code == 404
    print(f"detected {tamperer} {detected_s:.1f} s after the switch")
