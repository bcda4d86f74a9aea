"""Bounds every service puts on what it is sent, so bad input is a 4xx and never reaches a 5xx.

- :class:`BodyLimit`: a request body larger than the service accepts is a 413
  with a detail, checked on the declared ``Content-Length`` before anything is
  read and again on the bytes actually received (a chunked body declares none).
- :data:`MAX_SQL_INT`: the largest integer a query parameter may carry where it
  reaches SQL (SQLite and PostgreSQL store 64-bit integers; a larger one raised
  OverflowError deep in the driver).
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_SQL_INT = 2**63 - 1
DEFAULT_MAX_BODY_BYTES = 8 << 20


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send, f"request body of {declared[:40].decode('latin-1')} bytes")
            return
        received, started, refused = 0, False, False

        async def counted_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > self.max_bytes and not started:
                    # Answer now, and tell the app the client left: whatever it
                    # makes of that (FastAPI: a 400) is dropped by guarded_send.
                    refused = True
                    await self._refuse(send, f"request body of more than {received} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted_receive, guarded_send)

    async def _refuse(self, send: Send, what: str) -> None:
        body = json.dumps({"detail": f"{what} exceeds this service's limit of {self.max_bytes} bytes"})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body.encode()})
