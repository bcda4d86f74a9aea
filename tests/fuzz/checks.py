"""A schemathesis check the fuzz test loads (SCHEMATHESIS_HOOKS=tests.fuzz.checks): every 4xx says why.

edgeorch answers a refused request with JSON whose ``detail`` (or OpenAI-style
``error.message``) names the problem; a bare 4xx would leave the caller guessing.
"""

from __future__ import annotations

import json

import schemathesis


def _reason(body: object) -> str | None:
    if not isinstance(body, dict):
        return None
    if body.get("detail"):
        return str(body["detail"])
    error = body.get("error")
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return None


@schemathesis.check
def client_error_has_detail(ctx, response, case) -> bool | None:
    """A 4xx answer carries a JSON body with a non-empty ``detail`` (or ``error.message``)."""
    if not 400 <= response.status_code < 500:
        return None
    try:
        body = json.loads(response.content or b"null")
    except ValueError:
        body = None
    if _reason(body) is None:
        raise AssertionError(f"{response.status_code} without a detail: {response.content[:200]!r}")
    return True
