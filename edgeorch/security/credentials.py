"""Stage credentials: a forward or session call must carry the credential of the stage it calls.

A credential is a per-stage bearer token, sent in :data:`CREDENTIAL_HEADER`.
Stages of a rollout get theirs derived from the rollout secret and the stage
id, which names the deployment and the plan version
(``{deployment}.v{version}.s{index}``): every party that verifies the signed
rollout (the broadcast service, each worker, the orchestrator) computes the
same credential without it ever travelling in a rollout message, and one
stage's credential opens no other stage, of this deployment or another.
A stage loaded by hand (``edgeorch chain``, a test) carries the credential
its loader chose in its spec. Why a bearer token and not a MAC per frame:
docs/design.md, "As built: security".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from functools import lru_cache

CREDENTIAL_HEADER = "x-edgeorch-stage-credential"
# What a spec accepts as a credential: URL-safe base64, long enough to be unguessable.
CREDENTIAL_PATTERN = r"^[A-Za-z0-9_-]{16,128}$"
_PURPOSE = b"edgeorch stage credential v1"


@lru_cache(maxsize=4096)
def stage_credential(secret: str, stage_id: str) -> str:
    """The credential of ``stage_id`` under the rollout ``secret`` (deterministic, 32 characters)."""
    key = hmac.new(secret.encode(), _PURPOSE, hashlib.sha256).digest()
    mac = hmac.new(key, stage_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:24]).decode()


def new_credential() -> str:
    """A random credential, for stages loaded outside a rollout (``edgeorch chain``)."""
    return secrets.token_urlsafe(24)


def credential_headers(credential: str | None) -> dict[str, str]:
    """The header a caller sends to a stage with this credential (none for an open stage)."""
    return {CREDENTIAL_HEADER: credential} if credential else {}


def credential_ok(expected: str | None, given: str | None) -> bool:
    """Whether ``given`` opens a stage whose credential is ``expected`` (None: the stage is open).

    Constant-time over bytes: the time taken does not say how much of a guess was right.
    """
    if expected is None:
        return True
    if given is None:
        return False
    return hmac.compare_digest(given.encode("latin-1", "replace"), expected.encode())
