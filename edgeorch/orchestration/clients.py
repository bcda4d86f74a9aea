"""The orchestrator's REST clients for the monitor, the splitter and broadcast.

Each call names the service in its error, so a failure in the control loop
says which dependency failed and what it answered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from pydantic import TypeAdapter

from edgeorch.schemas.monitor import LinkView, NodeView
from edgeorch.schemas.plan import PlanRequest, PlanResponse
from edgeorch.schemas.rollout import PlacementView, Plan, RolloutRequest, RolloutView
from edgeorch.security.certs import client_verify

_NODES = TypeAdapter(list[NodeView])
_LINKS = TypeAdapter(list[LinkView])


class ServiceError(RuntimeError):
    """A control-plane service failed or refused.

    ``status`` is its HTTP code (0: unreachable), ``detail`` its message (or
    the splitter's structured 422), ``kind`` the error JSON's ``kind`` field
    when the service sends one (broadcast's refusals do).
    """

    def __init__(self, service: str, status: int, detail: Any, kind: str | None = None):
        super().__init__(f"{service} answered {status}: {detail}" if status else f"{service}: {detail}")
        self.service = service
        self.status = status
        self.detail = detail
        self.kind = kind


class ControlPlane:
    """Async clients of the three services the orchestrator drives."""

    def __init__(self, monitor_url: str, splitter_url: str, broadcast_url: str, admin_token: str = ""):
        headers = {"authorization": f"Bearer {admin_token}"} if admin_token else {}
        self.http = httpx.AsyncClient(timeout=30.0, headers=headers, verify=client_verify())
        self.monitor_url = monitor_url.rstrip("/")
        self.splitter_url = splitter_url.rstrip("/")
        self.broadcast_url = broadcast_url.rstrip("/")
        self._inflight: dict[tuple, asyncio.Task] = {}

    async def shared(self, key: tuple, fetch: Callable[[], Awaitable[Any]]) -> Any:
        """``fetch()``'s answer, fetched once for every caller that asks while it is in flight.

        Deployments look at the fleet together (one monitor event wakes them
        all): at 1,000 nodes each look read and parsed the monitor's 48,000
        links (~60 MB of objects) for itself, and the orchestrator's peak
        memory held one copy per deployment. The answer is shared, so callers
        must not change it; an error reaches every caller; a caller that is
        cancelled does not cancel the fetch for the others.
        """
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(fetch())
            self._inflight[key] = task

            def done(t: asyncio.Task) -> None:
                self._inflight.pop(key, None)
                if not t.cancelled():
                    t.exception()  # retrieved here too: every caller may have gone

            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def close(self) -> None:
        """Close the connection pool."""
        await self.http.aclose()

    async def _call(self, service: str, method: str, url: str, raw: bool = False, **kw) -> Any:
        """The answer's JSON (``raw``: its bytes); ServiceError for a 4xx/5xx or no answer."""
        try:
            resp = await self.http.request(method, url, **kw)
        except httpx.HTTPError as exc:
            raise ServiceError(service, 0, f"unreachable at {url}: {exc!r}") from exc
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                body = None
            if not isinstance(body, dict):
                raise ServiceError(service, resp.status_code, resp.text)
            raise ServiceError(service, resp.status_code, body.get("detail", resp.text), body.get("kind"))
        return resp.content if raw else resp.json()

    # ----- monitor -----------------------------------------------------------

    async def nodes(self, model: str) -> list[NodeView]:
        """Every node the monitor knows, with its speed on ``model``."""

        # Parsed and validated in one pass by pydantic's JSON parser: at 1,000 nodes (16,000 links)
        # json.loads followed by validate_python was a quarter of the orchestrator's CPU.
        async def fetch() -> list[NodeView]:
            body = await self._call(
                "monitor", "GET", f"{self.monitor_url}/v1/nodes", raw=True, params={"model": model}
            )
            return _NODES.validate_json(body)

        return await self.shared(("nodes", model), fetch)

    async def links(self) -> list[LinkView]:
        """Measured links between live nodes (one fetch shared by concurrent callers: do not change it)."""

        async def fetch() -> list[LinkView]:
            return _LINKS.validate_json(
                await self._call("monitor", "GET", f"{self.monitor_url}/v1/links", raw=True)
            )

        return await self.shared(("links",), fetch)

    async def request_profile(self, model: str) -> None:
        """Have every node calibrate ``model`` (idempotent)."""
        await self._call("monitor", "POST", f"{self.monitor_url}/v1/profiles", json={"model": model})

    # ----- splitter ----------------------------------------------------------

    async def plan(self, req: PlanRequest) -> PlanResponse:
        """The splitter's plan for ``req`` (raises ServiceError 422 when infeasible)."""
        body = await self._call("splitter", "POST", f"{self.splitter_url}/v1/plan",
                                content=req.model_dump_json(), headers={"content-type": "application/json"})  # fmt: skip
        return PlanResponse.model_validate(body)

    # ----- broadcast ---------------------------------------------------------

    async def start_rollout(self, deployment: str, plan: Plan, wait_s: float) -> RolloutView:
        """Start a rollout; an older version still draining is released at once (its sessions are
        replayed by the gateway); while another rollout is in flight, wait for it (409)."""
        req = RolloutRequest(deployment=deployment, plan=plan, supersede_drain=True)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                body = await self._call("broadcast", "POST", f"{self.broadcast_url}/v1/rollouts",
                                        content=req.model_dump_json(), headers={"content-type": "application/json"})  # fmt: skip
                return RolloutView.model_validate(body)
            except ServiceError as exc:
                if exc.kind != "rollout_in_flight" or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.2)

    async def rollout(self, rollout_id: str) -> RolloutView:
        """A rollout's phase and acks."""
        body = await self._call("broadcast", "GET", f"{self.broadcast_url}/v1/rollouts/{rollout_id}")
        return RolloutView.model_validate(body)

    async def wait_rollout(self, rollout_id: str, timeout_s: float) -> RolloutView:
        """Poll until the rollout is committed (or further) or aborted; returns the last view."""
        deadline = time.monotonic() + timeout_s
        while True:
            view = await self.rollout(rollout_id)
            if view.phase in ("committed", "completed", "aborted"):
                return view
            if time.monotonic() > deadline:
                raise ServiceError("broadcast", 0, f"rollout {rollout_id} still {view.phase} "
                                                   f"after {timeout_s:.0f}s")  # fmt: skip
            await asyncio.sleep(0.05)

    async def deployment(self, name: str) -> PlacementView | None:
        """Broadcast's view of a deployment (active version, its stages), or None before its first commit."""
        try:
            body = await self._call("broadcast", "GET", f"{self.broadcast_url}/v1/deployments/{name}")
        except ServiceError as exc:
            if exc.status == 404:
                return None
            raise
        return PlacementView.model_validate(body)
