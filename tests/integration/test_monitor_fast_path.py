"""The heartbeat's fast path (services/monitor/fast_path.py) on a real monitor process.

The path bypasses FastAPI's routing for ``POST /v1/nodes/{id}/heartbeat``, so
it must answer every case as the route did: the reply, 404, 413, 422 in
FastAPI's error shape, and a malformed node id still refused by the route's
own path pattern. A heartbeat it accepted must have the route's effects
(live state, calibrations stored, the metric counted).
"""

from __future__ import annotations

import httpx
import pytest

from edgeorch.local.launcher import LocalService, free_port
from edgeorch.schemas.monitor import HeartbeatReply, LinkView
from edgeorch.service.limits import DEFAULT_MAX_BODY_BYTES
from tests.integration.rollout_helpers import REDIS_URL

BEAT = {"cpu_percent": 7.5, "memory_free_bytes": 123, "queue_depth": 2, "sessions": 1}


@pytest.fixture(scope="module")
def monitor(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fast-path")
    env = {"EDGEORCH_DATABASE_URL": f"sqlite:///{tmp / 'monitor.db'}", "EDGEORCH_REDIS_URL": REDIS_URL}
    mon = LocalService("monitor", ["monitor"], free_port(), env, tmp)
    try:
        mon.wait_healthy()
        for nid in ("n1", "n2"):
            reg = {
                "node_id": nid,
                "url": f"http://127.0.0.1:9/{nid}",
                "capacity": {"cores": 1, "memory_bytes": 1},
            }
            assert httpx.post(f"{mon.url}/v1/nodes", json=reg, timeout=30).status_code == 200
        yield mon.url
    finally:
        mon.stop()


def _beat(url: str, node: str, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/nodes/{node}/heartbeat", timeout=30, **kw)


def test_an_accepted_heartbeat_answers_the_reply_and_has_the_routes_effects(monitor) -> None:
    before = httpx.get(f"{monitor}/metrics", timeout=30).text
    resp = _beat(monitor, "n1", json=BEAT)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    reply = HeartbeatReply.model_validate_json(resp.content)
    assert [p.node_id for p in reply.peers] == ["n2"] and reply.peers[0].url == "http://127.0.0.1:9/n2"
    view = httpx.get(f"{monitor}/v1/nodes/n1", timeout=30).json()
    assert view["live"]["cpu_percent"] == 7.5 and view["live"]["queue_depth"] == 2
    count = lambda text: sum(  # noqa: E731
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("edgeorch_monitor_heartbeats_total")
    )
    assert count(httpx.get(f"{monitor}/metrics", timeout=30).text) == count(before) + 1


def test_a_heartbeat_with_a_profile_stores_the_calibration(monitor) -> None:
    profile = {"model": "m", "prefill_tokens": 64, "decode_context": 64, "units": [],
               "decode_flops_per_s": 2e9, "prefill_flops_per_s": 8e9, "seconds_per_token_decode": 0.01,
               "took_s": 1.0}  # fmt: skip
    assert _beat(monitor, "n2", json={**BEAT, "profiles": [profile]}).status_code == 200
    assert "m" in httpx.get(f"{monitor}/v1/nodes/n2", timeout=30).json()["profiles"]
    # The reply now says the node has profiled "m".
    assert HeartbeatReply.model_validate_json(_beat(monitor, "n2", json=BEAT).content).profiled_models == [
        "m"
    ]


def test_bad_heartbeats_get_the_routes_4xx_and_change_nothing(monitor) -> None:
    live = httpx.get(f"{monitor}/v1/nodes/n1", timeout=30).json()["live"]
    unknown = _beat(monitor, "nobody", json=BEAT)
    assert unknown.status_code == 404 and "nobody" in unknown.json()["detail"]
    invalid = _beat(monitor, "n1", json={**BEAT, "cpu_percent": -1})
    assert invalid.status_code == 422
    assert [e["loc"] for e in invalid.json()["detail"]] == [["body", "cpu_percent"]]
    extra = _beat(monitor, "n1", json={**BEAT, "surprise": 1})
    assert extra.status_code == 422 and extra.json()["detail"][0]["loc"] == ["body", "surprise"]
    not_json = _beat(monitor, "n1", content=b"{not json", headers={"content-type": "application/json"})
    assert not_json.status_code == 422 and not_json.json()["detail"][0]["type"] == "json_invalid"
    huge = _beat(monitor, "n1", content=b" " * (DEFAULT_MAX_BODY_BYTES + 1))
    assert huge.status_code == 413 and "limit" in huge.json()["detail"]
    # An id outside the pattern is left to the FastAPI route, whose path check refuses it.
    assert _beat(monitor, "bad%20id", json=BEAT).status_code == 422
    assert httpx.get(f"{monitor}/v1/nodes/n1", timeout=30).json()["live"] == live


def test_links_are_served_with_linkviews_fields(monitor) -> None:
    sample = {"dst": "n2", "rtt_s": 0.004, "bandwidth_bytes_per_s": 5e6, "samples": 3}
    assert _beat(monitor, "n1", json={**BEAT, "links": [sample]}).status_code == 200
    links = httpx.get(f"{monitor}/v1/links", timeout=30).json()
    assert [(lk["src"], lk["dst"], lk["bandwidth_bytes_per_s"]) for lk in links] == [("n1", "n2", 5e6)]
    assert set(links[0]) == set(LinkView.model_fields)
    assert links[0]["provisional"] is False
