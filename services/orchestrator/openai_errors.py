"""Gateway errors in the shape OpenAI clients read, as well as the project's ``{"detail": ...}``.

The official client takes an error's text from ``error.message`` and its
``param`` from ``error.param``; a body with only ``detail`` reaches the caller
as a bare "Error code: 400". So the gateway answers both keys.
"""

from __future__ import annotations

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          422: "invalid_request_error", 429: "rate_limit_error"}  # fmt: skip


class GatewayError(HTTPException):
    """An HTTP error of the OpenAI-compatible routes; ``param`` names the request field at fault."""

    def __init__(
        self, status: int, detail: str, param: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(status, detail, headers)
        self.param = param


async def gateway_error_response(request: Request, exc: Exception) -> JSONResponse:
    """The JSON answer for a GatewayError: ``detail`` plus OpenAI's ``error`` object."""
    if not isinstance(exc, GatewayError):  # registered for GatewayError only
        raise exc
    error = {"message": exc.detail, "type": _TYPES.get(exc.status_code, "api_error"), "param": exc.param,
             "code": None}  # fmt: skip
    return JSONResponse(
        {"detail": exc.detail, "error": error}, status_code=exc.status_code, headers=exc.headers
    )
