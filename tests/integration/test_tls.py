"""Mutual TLS on a real service process: `edgeorch certs init`, then a splitter served with EDGEORCH_TLS_*.

A client with a certificate of the same CA is served; one without a
certificate, one with a certificate of another CA, and one speaking plain HTTP
are refused before any route runs. The splitter stands for every service: all
five serve through the same ``serve()``.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import time

import httpx
import pytest

from edgeorch.local.launcher import CLI, free_port
from tests.support import REPO


def _certs(directory, names: str) -> None:
    result = subprocess.run([*CLI, "certs", "init", str(directory), "--names", names], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr


def _client(ca, cert=None, key=None) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return httpx.Client(verify=ctx, timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    _certs(root / "ours", "splitter,client")
    _certs(root / "rogue", "client")
    ours = root / "ours"
    port = free_port()
    env = {"EDGEORCH_TLS_CERT": str(ours / "splitter.pem"), "EDGEORCH_TLS_KEY": str(ours / "splitter.key"),
           "EDGEORCH_TLS_CA": str(ours / "ca.pem")}  # fmt: skip
    log = (root / "splitter.log").open("wb")
    proc = subprocess.Popen([*CLI, "splitter", "--port", str(port)], cwd=REPO, env={**os.environ, **env},
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"https://127.0.0.1:{port}"
    try:
        with _client(ours / "ca.pem", ours / "client.pem", ours / "client.key") as client:
            deadline = time.monotonic() + 90
            while True:
                try:
                    if client.get(f"{url}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, (
                    root / "splitter.log"
                ).read_text()
                time.sleep(0.3)
        yield url, root
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_a_client_with_a_certificate_of_the_ca_is_served(served) -> None:
    url, root = served
    ours = root / "ours"
    with _client(ours / "ca.pem", ours / "client.pem", ours / "client.key") as client:
        assert client.get(f"{url}/healthz").json()["service"] == "splitter"


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate"])
def test_a_client_without_a_valid_certificate_is_refused(served, who: str) -> None:
    url, root = served
    cert = None if who == "no certificate" else (root / "rogue" / "client.pem", root / "rogue" / "client.key")
    with _client(root / "ours" / "ca.pem", *(cert or ())) as client, pytest.raises(httpx.TransportError):
        client.get(f"{url}/healthz")


def test_plain_http_is_not_served(served) -> None:
    url, _ = served
    try:
        resp = httpx.get(url.replace("https://", "http://") + "/healthz", timeout=10)
    except httpx.TransportError:
        return
    assert resp.status_code != 200


def test_the_hop_clients_speak_tls_with_the_process_certificate(served) -> None:
    import asyncio

    from edgeorch.security.certs import tls_settings_for
    from edgeorch.transport.hopclient import HopClient, HopError, SyncHopClient

    url, root = served
    ctx = tls_settings_for(root / "ours", "client").client_context()
    sync = SyncHopClient(timeout_s=10, ssl_context=ctx)
    try:
        for _ in range(3):  # one connection, kept alive
            assert sync.request("GET", f"{url}/healthz").json()["service"] == "splitter"
        assert len(sync._conns) == 1
    finally:
        sync.close()

    async def both() -> None:
        hop = HopClient(timeout_s=10, ssl_context=ctx)
        try:
            assert (await hop.request("GET", f"{url}/healthz")).json()["service"] == "splitter"
        finally:
            await hop.aclose()
        bare = HopClient(timeout_s=10, ssl_context=None)  # a process without EDGEORCH_TLS_*
        with pytest.raises(HopError, match="no TLS settings"):
            await bare.request("GET", f"{url}/healthz")
        rogue = tls_settings_for(root / "rogue", "client").client_context()
        refused = HopClient(timeout_s=10, ssl_context=rogue)  # verifies the server against the wrong CA
        with pytest.raises(HopError):
            await refused.request("GET", f"{url}/healthz")

    asyncio.run(both())
