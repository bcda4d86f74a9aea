"""The broadcast API in process: bad input gets a precise 4xx, never a 500; probes and metrics answer."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from edgeorch.local.launcher import free_port
from edgeorch.rollout.signing import SIGNATURE_HEADER, MessageVerifier, sign_bytes
from services.broadcast.app import BroadcastSettings, create_app

SECRET = "api-test-secret"
PLAN = {
    "model": "tiny-llama",
    "stages": [{"node": "a", "url": "http://127.0.0.1:9", "start": 0, "end": 6}],
}


@pytest.fixture
def client(tmp_path):
    settings = BroadcastSettings(database_url=f"sqlite:///{tmp_path / 'b.db'}", rollout_secret=SECRET,
                                 prepare_timeout_s=60, probe_interval_s=60)  # fmt: skip
    with TestClient(create_app(settings)) as c:
        yield c


def _ack(client, rollout_id: str, body: dict, secret: str = SECRET):
    raw = json.dumps(body).encode()
    return client.post(f"/v1/rollouts/{rollout_id}/acks", content=raw,
                       headers={SIGNATURE_HEADER: sign_bytes(raw, secret), "content-type": "application/json"})  # fmt: skip


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"deployment": "a.b", "plan": PLAN}, "deployment"),
        ({"deployment": "d", "plan": {**PLAN, "stages": []}}, "stages"),
        (
            {"deployment": "d", "plan": {**PLAN, "stages": [{**PLAN["stages"][0], "start": 1}]}},
            "must start at 0",
        ),
        (
            {"deployment": "d", "plan": {**PLAN, "stages": [{"node": "a", "start": 0, "end": 6}]}},
            "has no url",
        ),
        (
            {"deployment": "d", "plan": {**PLAN, "stages": [{**PLAN["stages"][0], "node": "a b"}]}},
            "is not a node id",
        ),
        ({"deployment": "d", "plan": {**PLAN, "stages": [{**PLAN["stages"][0], "url": "ftp://x"}]}}, "url"),
        ({"deployment": "d", "plan": {**PLAN, "stages": [{**PLAN["stages"][0], "node_id": "a"}]}}, "node_id"),
        ({"deployment": "d", "version": 0, "plan": PLAN}, "version"),
        ({"deployment": "d", "plan": PLAN, "extra": 1}, "extra"),
    ],
)
def test_malformed_rollouts_are_422(client, body, fragment) -> None:
    resp = client.post("/v1/rollouts", json=body)
    assert resp.status_code == 422
    assert fragment in json.dumps(resp.json()["detail"])


def test_rollout_lifecycle_errors_and_signed_desired_state(client) -> None:
    r = client.post("/v1/rollouts", json={"deployment": "d", "plan": PLAN})
    assert r.status_code == 201
    rid = r.json()["id"]
    assert client.post("/v1/rollouts", json={"deployment": "d", "plan": PLAN}).status_code == 409
    assert client.get("/v1/rollouts/nope").status_code == 404
    assert client.get("/v1/rollouts/bad id!").status_code == 422
    assert client.get("/v1/deployments/d").status_code == 404  # not committed yet

    desired = client.get("/v1/nodes/a/desired").json()
    v = MessageVerifier(SECRET)
    assert v.check_desired(desired, "a") is None
    assert desired["deployments"][0]["prepare"] == {"rollout_id": rid, "version": 1}

    good = {"rollout_id": rid, "node_id": "a", "ok": True, "prepare_s": 0.1, "bytes_read": 5}
    assert _ack(client, rid, good, secret="wrong").status_code == 401
    unsigned = client.post(f"/v1/rollouts/{rid}/acks", json=good)
    assert unsigned.status_code == 401 and "signature" in unsigned.json()["detail"]
    assert _ack(client, "other", good).status_code == 422  # body names another rollout
    assert _ack(client, rid, {**good, "node_id": "z"}).status_code == 409
    assert _ack(client, rid, {**good, "prepare_s": -1}).status_code == 422
    assert _ack(client, "nope", {**good, "rollout_id": "nope"}).status_code == 404
    assert _ack(client, rid, good).status_code == 200
    listed = client.get("/v1/rollouts", params={"deployment": "d"}).json()
    assert [x["id"] for x in listed] == [rid] and listed[0]["acks"][0]["bytes_read"] == 5


def test_a_plan_in_the_old_format_is_still_accepted(client) -> None:
    # Broadcast's plans named a stage's node "node_id" before the one stage type; callers may still.
    old = {**PLAN, "stages": [{"node_id": "a", "url": "http://127.0.0.1:9", "start": 0, "end": 6}]}
    r = client.post("/v1/rollouts", json={"deployment": "d", "plan": old})
    assert r.status_code == 201, r.text
    assert r.json()["nodes"] == ["a"]


def test_probes_and_metrics(client) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    # The default Redis (127.0.0.1:6379) runs wherever these tests run, so ready means ready.
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
    client.post("/v1/rollouts", json={"deployment": "m", "plan": PLAN})
    text = client.get("/metrics").text
    assert 'edgeorch_broadcast_rollouts_total{outcome="started"} 1.0' in text
    for name in ("edgeorch_broadcast_prepare_seconds", "edgeorch_broadcast_commit_seconds"):
        assert f"# TYPE {name} histogram" in text


def test_not_ready_without_redis_and_says_why(tmp_path) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = BroadcastSettings(database_url=f"sqlite:///{tmp_path / 'b.db'}", rollout_secret=SECRET,
                                 redis_url=nowhere)  # fmt: skip
    with TestClient(create_app(settings)) as c:
        ready = c.get("/readyz")
        assert c.get("/healthz").status_code == 200  # alive, only not ready
    assert ready.status_code == 503 and nowhere in ready.json()["problems"]["redis"], ready.text
