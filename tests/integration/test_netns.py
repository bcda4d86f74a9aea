"""Workers in network namespaces of their own, their uplinks shaped by the kernel (tc tbf).

Needs root and a kernel with namespaces and the tbf qdisc (``edgeorch.local.netns``);
those tests are skipped elsewhere (the check runs with the first of them, not at
collection), the pure ones run anywhere. Every address here belongs to the testbed the test makes:
a bridge in the root namespace (the control plane) and one namespace per
worker. The stack serves a real SmolLM2 deployment across them; one worker's
uplink is then capped at 12 Mbit/s, and the monitor must measure that on its
links (and only on its links) although the worker itself paces nothing.
"""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest

from edgeorch.local.netns import tbf_args, unavailable_reason
from edgeorch.local.scenario import Scenario, WorkerSpec
from edgeorch.local.stack import LocalStack
from tests.integration.rollout_helpers import wait_for

CAP_MBPS = 12.0


@pytest.fixture(scope="session")
def testbed_possible() -> None:
    """Skip unless this machine can make a testbed.

    Probing makes a small one (a bridge, a namespace, a tbf) and removes it, so
    it runs when the first test that needs a testbed runs, not when pytest
    collects the file; tests that need none (test_tbf_parameters) run anywhere.
    """
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no network namespaces: {reason}")


@pytest.fixture(scope="module")
def stack(testbed_possible, store, tmp_path_factory):
    scenario = Scenario(workers=[WorkerSpec(node_id=f"n{i}", memory_bytes=400 * 10**6) for i in (1, 2, 3)])
    with LocalStack(scenario, model_store=store.root, log_dir=tmp_path_factory.mktemp("netns"),
                    network="netns", jobs_worker=False, start_timeout_s=180) as s:  # fmt: skip
        yield s


def _links(stack: LocalStack) -> dict[tuple[str, str], dict]:
    rows = httpx.get(f"{stack.monitor_url}/v1/links", timeout=10).json()
    return {(lk["src"], lk["dst"]): lk for lk in rows}


def test_each_worker_has_its_own_namespace_and_address(stack) -> None:
    tb = stack.testbed
    assert tb is not None and stack.host == tb.host_ip
    urls = [w.url for w in stack.workers]
    hosts = {httpx.URL(u).host for u in urls}
    assert len(hosts) == 3 and stack.host not in hosts
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    for node in ("n1", "n2", "n3"):
        assert tb.nodes[node][0] in listed
    # the monitor knows each node at its namespace's address
    nodes = {n["node_id"]: n for n in httpx.get(f"{stack.monitor_url}/v1/nodes", timeout=10).json()}
    assert {nodes[w.name]["url"] for w in stack.workers} == set(urls)


def test_a_deployment_answers_across_the_namespaces(stack) -> None:
    headers = {"Authorization": f"Bearer {stack.admin_token}"}
    r = httpx.post(f"{stack.orchestrator_url}/v1/deployments", headers=headers, timeout=30,
                   json={"name": "smol", "model": "smollm2-135m"})  # fmt: skip
    assert r.status_code == 201, r.text

    def ready():
        d = httpx.get(f"{stack.orchestrator_url}/v1/deployments/smol", timeout=10).json()
        return d if d["state"] == "ready" else None

    d = wait_for(ready, 120, "deployment ready")
    assert len({s["node"] for s in d["stages"]}) >= 2, d["stages"]  # 400 MB each: one node cannot hold it
    body = {"model": "smol", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0, "max_tokens": 8}  # fmt: skip
    r = httpx.post(f"{stack.orchestrator_url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].startswith("The capital of France is Paris")


def test_a_capped_uplink_is_measured_on_that_nodes_links_only(stack) -> None:
    wait_for(lambda: len(_links(stack)) == 6, 30, "every link measured")
    before = _links(stack)
    stack.set_uplink("n2", CAP_MBPS)
    assert "tbf" in stack.testbed.uplink("n2") and "12Mbit" in stack.testbed.uplink("n2")
    # The worker paces nothing itself: the kernel does.
    emu = httpx.get(f"{stack.worker('n2').url}/v1/admin/emulation", timeout=10).json()
    assert emu["bandwidth_mbps"] is None
    t0 = time.monotonic()
    try:

        def capped():
            links = _links(stack)
            out = [links[("n2", d)]["bandwidth_bytes_per_s"] for d in ("n1", "n3")]
            return links if all(b and b < CAP_MBPS * 1e6 / 8 * 1.3 for b in out) else None

        # Measured in ~3 s on an idle machine; 30 s so that two busy cores only make it slower.
        links = wait_for(capped, 30, "n2's links measured near the cap")
        took = time.monotonic() - t0
        time.sleep(2.0)
        links = _links(stack)
    finally:
        stack.set_uplink("n2", None)
    mbps = {k: round(v["bandwidth_bytes_per_s"] * 8e-6, 1) for k, v in links.items()}
    print(f"uplink of n2 capped at {CAP_MBPS:g} Mbit/s: measured after {took:.1f}s; links now {mbps} Mbit/s; "
          f"before {({k: round(v['bandwidth_bytes_per_s'] * 8e-6) for k, v in before.items()})}")  # fmt: skip
    for dst in ("n1", "n3"):
        assert mbps[("n2", dst)] == pytest.approx(CAP_MBPS, rel=0.25)
    for (src, _dst), value in mbps.items():
        if src != "n2":
            assert value > 4 * CAP_MBPS, (src, value)


def test_tbf_parameters() -> None:
    assert tbf_args(10) == ["rate", "10000000bit", "burst", "4096", "latency", "500ms"]
    assert tbf_args(1000)[3] == "250000"  # 2 ms at 1 Gbit/s
    with pytest.raises(ValueError):
        tbf_args(0)


def test_a_closed_testbed_leaves_no_namespace_or_interface(testbed_possible) -> None:
    from edgeorch.local.netns import Testbed

    tb = Testbed()
    names = [tb.nodes.get(n) or tb.add_node(n) for n in ("a", "b")]
    assert len(set(names)) == 2
    spaces = [ns for ns, _, _ in tb.nodes.values()]
    tb.set_uplink("a", 5)
    assert "5Mbit" in tb.uplink("a")
    tb.close()
    tb.close()  # twice is fine
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    assert not any(ns in listed for ns in spaces)
    assert f"eo{tb.id}" not in links


def test_a_testbed_left_by_a_killed_process_is_removed_by_the_next(testbed_possible) -> None:
    import sys

    from edgeorch.local.netns import remove_stale

    code = ("import os; from edgeorch.local.netns import Testbed; tb = Testbed(); tb.add_node('a'); "
            "print(tb.bridge, tb.nodes['a'][0], flush=True); os.kill(os.getpid(), 9)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    bridge, ns = out.stdout.split()

    def ip(*args: str) -> str:
        return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout

    assert bridge in ip("-o", "link", "show") and ns in ip("netns", "list")
    assert bridge in remove_stale()
    assert bridge not in ip("-o", "link", "show") and ns not in ip("netns", "list")
