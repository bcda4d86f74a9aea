"""The admin token check and the loopback rule, on a small in-process app."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from edgeorch.service.auth import AdminAuth, InsecureBindError, admin_headers, check_bind, is_loopback

TOKEN = "unit-test-admin-token"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "::1", "localhost", "LOCALHOST"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)
    check_bind(host, "", "worker")  # no token needed on loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.0.0.7", "192.168.1.2", "example.org"])
def test_other_hosts_need_a_token(host: str) -> None:
    assert not is_loopback(host)
    with pytest.raises(InsecureBindError, match="EDGEORCH_ADMIN_TOKEN is empty but monitor"):
        check_bind(host, "", "monitor")
    check_bind(host, TOKEN, "monitor")  # with a token any address will do


def test_admin_headers() -> None:
    assert admin_headers("") == {}
    assert admin_headers(TOKEN) == {"Authorization": f"Bearer {TOKEN}"}


def _client(**state) -> TestClient:
    app = FastAPI()
    for k, v in state.items():
        setattr(app.state, k, v)

    @app.post("/change", dependencies=[AdminAuth])
    async def change() -> dict:
        return {"changed": True}

    return TestClient(app)


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ({}, "needs Authorization: Bearer <EDGEORCH_ADMIN_TOKEN>"),
        ({"Authorization": TOKEN}, "needs Authorization"),  # no scheme
        ({"Authorization": f"Basic {TOKEN}"}, "needs Authorization"),
        ({"Authorization": "Bearer "}, "needs Authorization"),
        ({"Authorization": "Bearer wrong"}, "wrong admin token"),
        ({"Authorization": f"Bearer {TOKEN}x"}, "wrong admin token"),
        ({"Authorization": "Bearer caf\xe9".encode("latin-1")}, "wrong admin token"),  # not ASCII: no 500
    ],
)
def test_a_guarded_call_without_the_token_is_401(headers, fragment: str) -> None:
    resp = _client(admin_token=TOKEN).post("/change", headers=headers)
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == "Bearer"
    assert fragment in resp.json()["detail"]


@pytest.mark.parametrize("value", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"Bearer  {TOKEN} "])
def test_the_right_token_passes(value: str) -> None:
    assert _client(admin_token=TOKEN).post("/change", headers={"Authorization": value}).json() == {
        "changed": True
    }


def test_no_token_configured_lets_calls_through() -> None:
    assert _client(admin_token="").post("/change").status_code == 200


def test_an_app_that_never_set_its_token_fails_closed() -> None:
    resp = _client().post("/change", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 500 and "admin token" in resp.json()["detail"]
