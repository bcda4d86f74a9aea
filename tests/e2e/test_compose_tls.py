"""The compose stack with mutual TLS (`make compose-up TLS=1`, docker-compose.tls.yml).

Marker ``compose``, like test_compose_stack.py, and run after it (one stack at a
time on the same published ports). `deploy/container.sh up --tls` makes the
certificates into .tls/ and starts the stack with the override; every edgeorch
container then serves HTTPS only with a client certificate required. Checked
from the host through the published ports (gateway, monitor, splitter,
broadcast) and from inside the stack's network for the workers, which publish
nothing: each refuses a client without a certificate, one with another CA's,
and plain HTTP, and serves one that presents a certificate of the stack's CA.
A greedy chat through the TLS stack equals the unsplit model's text.
"""

from __future__ import annotations

import ssl
import subprocess

import httpx
import pytest

from tests.e2e.compose_support import MODEL, PORTS, WORKERS, container, running_stack
from tests.reference import greedy_chat_answers
from tests.support import REPO

pytestmark = [pytest.mark.compose, pytest.mark.slow]
TLS = REPO / ".tls"
PUBLISHED = {"orchestrator": PORTS["GATEWAY"], "monitor": PORTS["MONITOR"], "splitter": PORTS["SPLITTER"],
             "broadcast": PORTS["BROADCAST"]}  # fmt: skip
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def stack():
    yield from running_stack("--tls")


@pytest.fixture(scope="module")
def client_tls(stack) -> ssl.SSLContext:
    """The host's client certificate that `up --tls` wrote into .tls/."""
    ctx = ssl.create_default_context(cafile=str(TLS / "ca.pem"))
    ctx.load_cert_chain(str(TLS / "client.pem"), str(TLS / "client.key"))
    return ctx


@pytest.fixture(scope="module")
def rogue(tmp_path_factory) -> ssl.SSLContext:
    """A client certificate of another CA, presented to the stack."""
    from edgeorch.security.certs import init_certs

    d = tmp_path_factory.mktemp("rogue")
    init_certs(d, ["client"])
    ctx = ssl.create_default_context(cafile=str(TLS / "ca.pem"))
    ctx.load_cert_chain(str(d / "client.pem"), str(d / "client.key"))
    return ctx


def _refused(url: str, verify) -> bool:
    try:
        resp = httpx.get(url, timeout=10, verify=verify)
    except httpx.TransportError:
        return True
    return resp.status_code != 200


def test_a_chat_through_the_tls_stack_equals_the_unsplit_model(stack, client_tls, store) -> None:
    token = _dotenv()["EDGEORCH_ADMIN_TOKEN"]
    gateway = f"https://localhost:{PORTS['GATEWAY']}"
    with httpx.Client(timeout=120, verify=client_tls) as client:
        view = client.get(f"{gateway}/v1/deployments/{MODEL}").json()
        assert view["state"] == "ready", view
        assert all(s["url"].startswith("https://") for s in view["stages"]), view["stages"]
        body = {"model": MODEL, "messages": CAPITAL, "max_tokens": 32, "temperature": 0}
        resp = client.post(f"{gateway}/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {token}"})  # fmt: skip
    assert resp.status_code == 200, resp.text
    expected = greedy_chat_answers(store.path(MODEL), {"capital": (CAPITAL, 32)})["capital"]
    assert resp.json()["choices"][0]["message"]["content"] == expected == "The capital of France is Paris."


def test_every_published_service_refuses_a_client_without_a_valid_certificate(
    stack, client_tls, rogue
) -> None:
    no_cert = ssl.create_default_context(cafile=str(TLS / "ca.pem"))
    for name, port in PUBLISHED.items():
        url = f"https://localhost:{port}/healthz"
        assert httpx.get(url, timeout=10, verify=client_tls).status_code == 200, name
        assert _refused(url, no_cert), f"{name} served a client without a certificate"
        assert _refused(url, rogue), f"{name} served a client with another CA's certificate"
        assert _refused(f"http://localhost:{port}/healthz", True), f"{name} served plain HTTP"


# Run inside a worker container (the workers publish no port): the same four calls against
# every worker by its name on the stack's network, with this container's own certificate as
# the valid one. ssl and urllib only; prints one verdict per worker and call.
_PROBE = """
import ssl, sys, urllib.request as u
def get(url, ctx=None):
    try:
        return u.urlopen(url, timeout=10, context=ctx).status
    except Exception as exc:
        return type(exc).__name__
ca = '/tls/ca.pem'
good = ssl.create_default_context(cafile=ca); good.load_cert_chain('/tls/cert.pem', '/tls/key.pem')
bare = ssl.create_default_context(cafile=ca)
for w in sys.argv[1:]:
    print(w, get(f'https://{w}:8100/healthz', good), get(f'https://{w}:8100/healthz', bare),
          get(f'http://{w}:8100/healthz'))
"""


def test_every_worker_refuses_a_client_without_a_certificate_inside_the_stack(stack) -> None:
    out = subprocess.run(["docker", "exec", container("worker-a"), "python", "-c", _PROBE, *WORKERS],
                         capture_output=True, text=True, timeout=120, check=True).stdout  # fmt: skip
    verdicts = {line.split()[0]: line.split()[1:] for line in out.strip().splitlines()}
    print(f"workers (with certificate, without, plain HTTP): {verdicts}")
    assert set(verdicts) == set(WORKERS), out
    for worker, (good, bare, plain) in verdicts.items():
        assert good == "200", f"{worker} refused a certificate of its own CA: {good}"
        assert bare != "200", f"{worker} served a client without a certificate"
        assert plain != "200", f"{worker} served plain HTTP"


def test_no_key_is_readable_by_another_service(stack) -> None:
    """Each container sees the CA, its own certificate and its own key only."""
    out = subprocess.run(["docker", "exec", container("worker-b"), "ls", "/tls"], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()  # fmt: skip
    assert sorted(out) == ["ca.pem", "cert.pem", "key.pem"], out


def _dotenv() -> dict[str, str]:
    lines = (REPO / ".env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
