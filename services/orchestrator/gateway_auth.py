"""API keys on the gateway: with ``EDGEORCH_API_KEYS`` set, every gateway call needs one of them."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request


def api_keys(settings) -> list[str]:
    """The configured keys (comma-separated setting), empty when the gateway is open."""
    return [k.strip() for k in getattr(settings, "api_keys", "").split(",") if k.strip()]


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: a 401 unless the call carries ``Authorization: Bearer <one of the keys>``."""
    keys = api_keys(request.app.state.settings)
    if not keys:
        return
    scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
    given = given.strip().encode()
    # Compare against every key, so the time taken does not say which prefix matched.
    ok = scheme.lower() == "bearer" and any([hmac.compare_digest(given, k.encode()) for k in keys])
    if not ok:
        raise HTTPException(401, "this gateway needs Authorization: Bearer <API key> (EDGEORCH_API_KEYS)",
                            headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
