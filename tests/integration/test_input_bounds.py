"""The body limit on a real service process: a request body over 8 MiB is a 413 with a detail.

The splitter (no dependencies to start) stands for every service: the limit
lives in the base app they all share. Both ways a body can come: with a
declared Content-Length (refused before a byte is read) and chunked, with no
length (refused once the bytes received pass the limit).
"""

from __future__ import annotations

import httpx
import pytest

from edgeorch.service.limits import DEFAULT_MAX_BODY_BYTES
from tests.support import ServiceProcess, free_port


@pytest.fixture(scope="module")
def splitter(tmp_path_factory):
    proc = ServiceProcess(["splitter"], free_port(), {}, tmp_path_factory.mktemp("bounds") / "splitter.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.kill()


def test_a_declared_body_over_the_limit_is_refused(splitter) -> None:
    resp = httpx.post(f"{splitter.url}/v1/plan", content=b"x" * (DEFAULT_MAX_BODY_BYTES + 1), timeout=60)
    assert resp.status_code == 413
    assert str(DEFAULT_MAX_BODY_BYTES) in resp.json()["detail"]


def test_a_chunked_body_over_the_limit_is_refused(splitter) -> None:
    def chunks():
        for _ in range(DEFAULT_MAX_BODY_BYTES // (1 << 20) + 2):
            yield b"x" * (1 << 20)

    resp = httpx.post(f"{splitter.url}/v1/plan", content=chunks(), timeout=60)
    assert resp.status_code == 413 and "limit" in resp.json()["detail"]


def test_a_body_within_the_limit_reaches_the_route(splitter) -> None:
    resp = httpx.post(
        f"{splitter.url}/v1/plan", content=b"{}", headers={"content-type": "application/json"}, timeout=60
    )
    assert resp.status_code == 422 and resp.json()["detail"]  # the route's own validation answered
