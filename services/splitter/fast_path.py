"""``POST /v1/plan`` with its body parsed once, by pydantic's JSON parser.

FastAPI parses a JSON body with ``json.loads`` and then validates the dicts:
for a 1,000-node request (3.2 MB, 28,000 links) that is two full copies of
the request in memory (about 20 MiB of dicts and 15 MiB of models, measured
with tracemalloc at 1,000 simulated nodes, issue 23) while it waits for a
planning thread. This ASGI middleware answers ``POST /v1/plan`` itself:
the same body limit, ``PlanRequest.model_validate_json`` (the same checks),
the same answers (200 with the plan, 413, 422 with FastAPI's error shape or
the planner's causes). Every other request, and a body whose content type
is not JSON, goes to the app; the FastAPI route stays for the OpenAPI
document.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from edgeorch.schemas.plan import PlanRequest, PlanResponse
from edgeorch.service.limits import BodyLimit
from edgeorch.service.raw_json import read_model, send_json
from services.splitter.routes import PlanAnswer


class PlanFastPath:
    """ASGI middleware: ``POST /v1/plan`` answered directly (see the module's docstring)."""

    def __init__(self, app: ASGIApp, answer: PlanAnswer, max_bytes: int):
        self.app = app
        self.answer = answer
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] != "/v1/plan"
            or not _json_or_none(scope)
        ):
            await self.app(scope, receive, send)
            return
        # The shared body limit (edgeorch/service/limits.py) answers 413 for a body over it.
        await BodyLimit(self._plan, self.max_bytes)(scope, receive, send)

    async def _plan(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = await read_model(receive, send, PlanRequest)
        if req is None:
            return
        status, result = await self.answer(req)
        if isinstance(result, PlanResponse):
            await send_json(send, status, result.model_dump_json().encode())
        else:
            await send_json(send, status, {"detail": result})


def _json_or_none(scope: Scope) -> bool:
    """A body FastAPI would read as JSON: no content type, or a JSON one (others go to the app)."""
    kind = dict(scope["headers"]).get(b"content-type")
    if kind is None:
        return True
    media = kind.split(b";")[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))
