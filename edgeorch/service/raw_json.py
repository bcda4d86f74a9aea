"""ASGI helpers for a route answered without FastAPI's layers (a service's fast path).

A fast path reads the whole body itself, validates it with pydantic's JSON
parser in one pass, and answers JSON; its refusals keep FastAPI's shape
(422 ``{"detail": [{"loc": ["body", ...], "msg", "type"}]}``), so a client
cannot tell which layer answered. Used by the monitor's heartbeat path and
the splitter's plan path.
"""

from __future__ import annotations

from typing import TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.types import Receive, Send

M = TypeVar("M", bound=BaseModel)

_JSON = [(b"content-type", b"application/json")]


async def _read_body(receive: Receive) -> bytes | None:
    """The request's whole body; None when the client went away (or the body limit refused it)."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return bytes(body)


async def read_model(receive: Receive, send: Send, model: type[M]) -> M | None:
    """The body validated as ``model``; None when the client went away or a 422 was answered."""
    body = await _read_body(receive)
    if body is None:  # gone, or refused by the body limit
        return None
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        await send_json(send, 422, _validation_detail(exc))
        return None


def _validation_detail(exc: ValidationError) -> dict:
    """A 422 body in FastAPI's shape (the fields the services' error handler keeps)."""
    return {
        "detail": [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    }


async def send_json(send: Send, status: int, body: bytes | dict) -> None:
    """Answer ``status`` with a JSON body (bytes as they are; a dict serialised)."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    await send({"type": "http.response.start", "status": status,
                "headers": [*_JSON, (b"content-length", str(len(data)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": data})
