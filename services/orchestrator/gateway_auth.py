"""API keys and rate limits on the gateway.

With ``EDGEORCH_API_KEYS`` set, every gateway call needs one of them. With
``EDGEORCH_RATE_LIMIT_PER_S`` set, each key (each client address on an open
gateway) gets a token bucket of ``EDGEORCH_RATE_LIMIT_BURST`` requests refilled
at that rate; past it, a 429 with Retry-After.
"""

from __future__ import annotations

import hmac
import math

from fastapi import HTTPException, Request

from edgeorch.security.ratelimit import RateLimiter


def api_keys(settings) -> list[str]:
    """The configured keys (comma-separated setting), empty when the gateway is open."""
    return [k.strip() for k in getattr(settings, "api_keys", "").split(",") if k.strip()]


def rate_limiter(settings) -> RateLimiter | None:
    """The gateway's token buckets, or None when no rate limit is configured."""
    rate = getattr(settings, "rate_limit_per_s", 0.0)
    return RateLimiter(rate, settings.rate_limit_burst) if rate > 0 else None


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: a 401 unless the call carries ``Authorization: Bearer <one of the keys>``;
    a 429 when that key (or, on an open gateway, that client) is over its rate."""
    keys = api_keys(request.app.state.settings)
    scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
    given = given.strip().encode()
    if keys:
        # Compare against every key, so the time taken does not say which prefix matched.
        ok = scheme.lower() == "bearer" and any([hmac.compare_digest(given, k.encode()) for k in keys])
        if not ok:
            raise HTTPException(401, "this gateway needs Authorization: Bearer <API key> (EDGEORCH_API_KEYS)",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
    _check_rate(
        request, given.decode() if keys else f"client:{request.client.host if request.client else '?'}"
    )


def _check_rate(request: Request, key: str) -> None:
    limiter: RateLimiter | None = getattr(request.app.state, "rate_limiter", None)
    if limiter is None:
        return
    wait_s = limiter.take(key)
    if wait_s > 0:
        raise HTTPException(
            429, f"rate limit: {limiter.burst} requests at once, then {limiter.rate_per_s:g} per second per "
            f"API key; retry in {wait_s:.2f} s", headers={"Retry-After": str(math.ceil(wait_s))},
        )  # fmt: skip
