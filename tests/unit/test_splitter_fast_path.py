"""The splitter's raw-body path (services/splitter/fast_path.py) answers ``POST /v1/plan`` itself, as
the route would: the plan, 422s in FastAPI's shape or with the planner's causes, 413; anything else
goes to the app behind it."""

from __future__ import annotations

import asyncio
import json

import httpx
from prometheus_client import CollectorRegistry

from services.splitter.fast_path import PlanFastPath
from services.splitter.routes import PlanAnswer, PlanMetrics
from tests.integration.test_splitter_service import GOOD


def _client(max_bytes: int = 1 << 20) -> tuple[httpx.AsyncClient, list[str]]:
    passed: list[str] = []

    async def behind(scope, receive, send) -> None:  # the app the middleware passes requests to
        passed.append(f"{scope['method']} {scope['path']}")
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    answer = PlanAnswer(PlanMetrics(CollectorRegistry()), 1)
    app = PlanFastPath(behind, answer=answer, max_bytes=max_bytes)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://splitter"), passed


def test_plan_requests_are_answered_here_and_everything_else_passes_on() -> None:
    async def main() -> None:
        client, passed = _client()
        async with client:
            r = await client.post("/v1/plan", json=GOOD)
            assert r.status_code == 200 and r.json()["solver"]["optimal"] is True
            assert [s["node"] for s in r.json()["stages"]][0] == "edge"
            r = await client.post(
                "/v1/plan", content=json.dumps(GOOD)
            )  # no content type: JSON, as FastAPI reads it
            assert r.status_code == 200
            assert (await client.get("/v1/plan")).status_code == 299
            assert (await client.post("/v1/plans", json=GOOD)).status_code == 299
            r = await client.post(
                "/v1/plan", content=json.dumps(GOOD), headers={"content-type": "text/plain"}
            )
            assert r.status_code == 299  # not JSON: the route's own answer
        assert passed == ["GET /v1/plan", "POST /v1/plans", "POST /v1/plan"]

    asyncio.run(main())


def test_refusals_have_the_routes_shapes() -> None:
    async def main() -> None:
        client, passed = _client(max_bytes=4096)
        async with client:
            r = await client.post(
                "/v1/plan", content=b"{not json", headers={"content-type": "application/json"}
            )
            assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
            assert r.json()["detail"][0]["loc"][0] == "body"
            bad = {**GOOD, "source": "nowhere"}
            r = await client.post("/v1/plan", json=bad)
            assert r.status_code == 422 and "nowhere" in json.dumps(r.json()["detail"])
            tiny = {**GOOD, "nodes": [{**n, "memory_bytes": 10} for n in GOOD["nodes"]]}
            r = await client.post("/v1/plan", json=tiny)
            assert r.status_code == 422 and r.json()["detail"]["error"] == "infeasible"
            r = await client.post("/v1/plan", json={**GOOD, "padding": "x" * 8000})
            assert r.status_code == 413 and "detail" in r.json()
        assert passed == []

    asyncio.run(main())
