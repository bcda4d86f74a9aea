"""The whole local stack with mutual TLS (`LocalStack(tls_dir=...)`, what `edgeorch up --tls` runs).

Every service and worker serves HTTPS with a client certificate required, and
calls its peers with its own certificate: workers register and beat to the
monitor, broadcast delivers the rollout, the orchestrator plans through the
splitter, the gateway and the stages hop over TLS. A greedy answer through
that stack equals the unsplit Hugging Face model's, and every service refuses a client
with no certificate, one with another CA's, and plain HTTP.
"""

from __future__ import annotations

import ssl
import subprocess

import httpx
import pytest

from edgeorch.local.launcher import CLI
from edgeorch.local.stack import LocalStack
from edgeorch.local.up_command import calibrate, create_deployment, wait_ready
from tests.reference import greedy_chat_answers
from tests.support import REPO

TOKEN = "tls-admin-token"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def stack(store, tmp_path_factory):
    certs = tmp_path_factory.mktemp("certs")
    with LocalStack(
        workers=2, model_store=store.root, log_dir=tmp_path_factory.mktemp("logs"), admin_token=TOKEN,
        jobs_worker=False, start_timeout_s=180, tls_dir=certs,
    ) as s:  # fmt: skip
        with httpx.Client(timeout=120, verify=s.client_tls) as client:
            calibrate(client, s.monitor_url, TOKEN, "tiny-llama", [w.name for w in s.workers], 120)
            create_deployment(client, s.orchestrator_url, TOKEN, "sealed", "tiny-llama")
            wait_ready(client, s.orchestrator_url, "sealed", 180, s.log_dir)
        yield s


def _services(stack: LocalStack) -> dict[str, str]:
    urls = {"orchestrator": stack.orchestrator_url, "monitor": stack.monitor_url,
            "splitter": stack.splitter_url, "broadcast": stack.broadcast_url}  # fmt: skip
    urls.update({w.name: w.url for w in stack.workers})
    return urls


def test_every_url_is_https_and_the_plan_hops_over_tls(stack) -> None:
    assert all(url.startswith("https://") for url in _services(stack).values())
    with httpx.Client(timeout=30, verify=stack.client_tls) as client:
        view = client.get(f"{stack.orchestrator_url}/v1/deployments/sealed").json()
        nodes = client.get(f"{stack.monitor_url}/v1/nodes").json()
    assert view["state"] == "ready"
    assert all(s["url"].startswith("https://") for s in view["stages"]), view["stages"]
    assert {n["url"] for n in nodes} == {w.url for w in stack.workers}


def test_a_greedy_answer_through_the_tls_stack_equals_the_unsplit_model(stack, store) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    body = {"model": "sealed", "messages": messages, "max_tokens": 8, "temperature": 0}
    with httpx.Client(timeout=120, verify=stack.client_tls) as client:
        resp = client.post(f"{stack.orchestrator_url}/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
    assert resp.status_code == 200, resp.text
    expected = greedy_chat_answers(store.path("tiny-llama"), {"q": (messages, 8)})["q"]
    assert resp.json()["choices"][0]["message"]["content"] == expected


@pytest.fixture(scope="module")
def rogue(tmp_path_factory):
    """A certificate of another CA (same names)."""
    d = tmp_path_factory.mktemp("rogue")
    result = subprocess.run([*CLI, "certs", "init", str(d), "--names", "client"], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return d


def _refused(url: str, verify) -> bool:
    try:
        resp = httpx.get(f"{url}/healthz", timeout=10, verify=verify)
    except httpx.TransportError:
        return True
    return resp.status_code != 200


def test_every_service_refuses_a_client_without_a_valid_certificate(stack, rogue) -> None:
    ca = str(stack.tls_dir / "ca.pem")
    no_cert = ssl.create_default_context(cafile=ca)
    other_ca = ssl.create_default_context(cafile=ca)
    other_ca.load_cert_chain(str(rogue / "client.pem"), str(rogue / "client.key"))
    for name, url in _services(stack).items():
        assert httpx.get(f"{url}/healthz", timeout=10, verify=stack.client_tls).status_code == 200, name
        assert _refused(url, no_cert), f"{name} served a client without a certificate"
        assert _refused(url, other_ca), f"{name} served a client with another CA's certificate"
        assert _refused(url.replace("https://", "http://"), True), f"{name} served plain HTTP"
