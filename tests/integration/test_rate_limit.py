"""The gateway's rate limit per API key, on a real orchestrator process.

An orchestrator with two API keys and a limit of a burst of 3 then one request
every 4 s: the fourth quick call with one key is a 429 with Retry-After and a
detail, the other key is not affected, and after the advertised wait the first
key is served again. Admin routes are not rate-limited. The control-plane
services are not needed for GET /v1/models, so none are started.
"""

from __future__ import annotations

import time

import httpx

from tests.support import ServiceProcess, free_port

KEYS = ("key-one-0123456789", "key-two-0123456789")


def test_each_api_key_has_a_token_bucket(tmp_path) -> None:
    env = {
        "EDGEORCH_DATABASE_URL": f"sqlite:///{tmp_path / 'orchestrator.db'}",
        "EDGEORCH_API_KEYS": ",".join(KEYS),
        "EDGEORCH_RATE_LIMIT_PER_S": "0.25",  # slow enough that a busy machine does not refill it
        "EDGEORCH_RATE_LIMIT_BURST": "3",
        "EDGEORCH_ADMIN_TOKEN": "",
    }
    orchestrator = ServiceProcess(["orchestrator"], free_port(), env, tmp_path / "orchestrator.log")
    try:
        orchestrator.wait_ready()
        models = f"{orchestrator.url}/v1/models"

        def call(key: str) -> httpx.Response:
            return httpx.get(models, headers={"Authorization": f"Bearer {key}"}, timeout=30)

        assert [call(KEYS[0]).status_code for _ in range(3)] == [200, 200, 200]
        refused = call(KEYS[0])
        assert refused.status_code == 429, refused.text
        assert "rate limit" in refused.json()["detail"]
        wait_s = int(refused.headers["retry-after"])
        assert 1 <= wait_s <= 4  # one token refills in 4 s
        assert call(KEYS[1]).status_code == 200  # another key, another bucket
        assert httpx.get(models, timeout=30).status_code == 401  # no key: refused before any bucket
        time.sleep(wait_s)
        assert call(KEYS[0]).status_code == 200
    finally:
        orchestrator.kill()
