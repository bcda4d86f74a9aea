"""Heartbeats answered without FastAPI's routing and dependency layers.

Every node heartbeats once a second, so at a thousand nodes the heartbeat is
the monitor's whole load. Profiled at 600 simulated nodes (py-spy, 2026-12-04),
the handler itself was 8 % of the monitor's busy time and FastAPI's layers
around it (middleware, routing, dependency resolution, body parsing) about
half. This ASGI middleware answers ``POST /v1/nodes/{node_id}/heartbeat``
itself: the same body limit, the same validation (``Heartbeat``, in pydantic's
JSON parser), the same answers (200 with the reply, 404 for an unknown node,
413, 422 with FastAPI's error shape). Every other request, and a heartbeat
whose node id does not match the id pattern, goes to the app unchanged; the
FastAPI route stays for the OpenAPI document and for anything this path
passes on.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

from starlette.types import ASGIApp, Receive, Scope, Send

from edgeorch.monitoring.cluster import UnknownNode
from edgeorch.schemas.monitor import Heartbeat
from edgeorch.schemas.stage import ID_PATTERN
from edgeorch.service.limits import BodyLimit
from edgeorch.service.raw_json import read_model, send_json

_PATH = re.compile(r"/v1/nodes/([^/]+)/heartbeat")
_NODE_ID = re.compile(ID_PATTERN)


class HeartbeatFastPath:
    """ASGI middleware: the heartbeat route, answered directly (see the module's docstring)."""

    def __init__(self, app: ASGIApp, monitor: Callable[[], object | None], max_bytes: int):
        self.app = app
        self.monitor = monitor  # the Monitor once the lifespan has built it, else None
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = (
            _PATH.fullmatch(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        )
        monitor = self.monitor() if match else None
        if match is None or monitor is None or _NODE_ID.fullmatch(match.group(1)) is None:
            await self.app(scope, receive, send)
            return
        # The shared body limit (edgeorch/service/limits.py) answers 413 for a body over it.
        await BodyLimit(partial(self._heartbeat, monitor, match.group(1)), self.max_bytes)(
            scope, receive, send
        )

    async def _heartbeat(self, monitor, node_id: str, scope: Scope, receive: Receive, send: Send) -> None:
        hb = await read_model(receive, send, Heartbeat)
        if hb is None:
            return
        try:
            reply = await monitor.heartbeat(node_id, hb)
        except UnknownNode as exc:
            await send_json(send, 404, {"detail": str(exc)})
            return
        await send_json(send, 200, reply)
