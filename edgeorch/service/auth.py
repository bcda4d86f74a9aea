"""Access control for calls that change the system: one bearer admin token, and the loopback rule.

Every service that has such calls sets ``app.state.admin_token`` in its
``create_app`` and puts :data:`AdminAuth` on those routes. With a token
configured (``EDGEORCH_ADMIN_TOKEN``), a call must carry
``Authorization: Bearer <token>``; without one, the service may only listen on
loopback (:func:`check_bind`, called by the CLI before serving), so whoever can
call it already runs on the same machine.

Calls that carry the system's own data (worker registration and heartbeats,
rollout acks, forward steps) are not guarded by this token: they are either
signed already or the data the control plane decides from.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging

from fastapi import Depends, HTTPException, Request

log = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "EDGEORCH_ADMIN_TOKEN"
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


class InsecureBindError(ValueError):
    """No admin token is configured and the service listens beyond loopback."""


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, admin_token: str, service: str) -> None:
    """Refuse (raise :class:`InsecureBindError`) to serve admin calls beyond loopback without a token."""
    if admin_token:
        return
    if not is_loopback(host):
        raise InsecureBindError(
            f"{ADMIN_TOKEN_ENV} is empty but {service} would listen on {host!r}, where anyone who "
            f"reaches it could change the system; set {ADMIN_TOKEN_ENV} (clients send "
            "'Authorization: Bearer <token>') or listen on 127.0.0.1"
        )
    log.info("%s: no %s, admin calls are open to callers on this machine only", service, ADMIN_TOKEN_ENV)


def admin_headers(token: str) -> dict[str, str]:
    """The headers a client sends on an admin call: none when there is no token."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def _bearer(authorization: str | None) -> str | None:
    """The credentials of an ``Authorization: Bearer ...`` header (scheme case-insensitive), or None."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


async def require_admin(request: Request) -> None:
    """FastAPI dependency: a 401 unless the call carries the app's admin token (or none is configured)."""
    expected = getattr(request.app.state, "admin_token", None)
    if expected is None:
        # A service that guards a route but never said what its token is must
        # fail closed, not open: this is a bug in its create_app.
        log.error("%s %s is guarded but app.state.admin_token is not set", request.method, request.url.path)
        raise HTTPException(500, "server misconfigured: no admin token setting")
    if not expected:
        return
    given = _bearer(request.headers.get("authorization"))
    if given is None:
        problem = f"this call needs Authorization: Bearer <{ADMIN_TOKEN_ENV}>"
    # Bytes, not str: compare_digest refuses non-ASCII str, and header values may hold any latin-1.
    elif not hmac.compare_digest(given.encode(), expected.encode()):
        problem = f"wrong admin token; this call needs Authorization: Bearer <{ADMIN_TOKEN_ENV}>"
    else:
        return
    client = request.client.host if request.client else "?"
    log.warning("refused %s %s from %s: %s", request.method, request.url.path, client, problem)
    raise HTTPException(401, problem, headers=_CHALLENGE)


AdminAuth = Depends(require_admin)
