"""The dashboard in a real headless Chromium, on a real local stack serving SmolLM2.

One stack and one browser for the module: four workers offering 360 MB
each, so SmolLM2 in fp32 (~750 MB with its KV cache) spans three of them and
one is spare, as in tests/e2e/test_orchestrator.py. The page must show every
node, the deployment and its plan ranges as the API gives them, with no
console error; a worker slowed down from the page's admin form must show up
as a new plan and a re-split in the timeline within 15 s, without a reload;
a chat answer streamed in the page must equal the API's. Screenshots at 1280
and 390 px are written under pytest's tmp path (and into
``EDGEORCH_DASHBOARD_SHOTS`` when set, which is how docs/ got its copies).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from edgeorch.scenario import parse_scenario
from edgeorch.stack import LocalStack
from tests.browser.browser import console_errors, require_browser, start_chromium, stop_chromium
from tests.support import wait_for

pytestmark = pytest.mark.slow
HTTP = httpx.Client(timeout=60.0)
NODES = ["edge-1", "edge-2", "edge-3", "edge-4"]
CAPITAL = "What is the capital of France?"
CHANGE_S = 15.0  # the bound: a slowed node shows as a new plan within this


@pytest.fixture(scope="module")
def stack(store, tmp_path_factory):
    workers = [{"id": n, "memory": "360MB", "watts": w, "trusted": n == "edge-1"}
               for n, w in zip(NODES, (15, 6, 10, 8), strict=True)]  # fmt: skip
    s = LocalStack(parse_scenario({"workers": workers}), model_store=store.root,
                   log_dir=tmp_path_factory.mktemp("dashboard-stack"), private_redis=True, jobs_worker=False,
                   service_env={"EDGEORCH_REPLAN_INTERVAL_S": "2"})  # fmt: skip
    try:
        s.start()
        yield s
    finally:
        s.stop()


def admin(stack) -> dict[str, str]:
    return {"authorization": f"Bearer {stack.admin_token}"}


def deployment(stack, name: str) -> dict:
    return HTTP.get(f"{stack.orchestrator_url}/v1/deployments/{name}").json()


def events(stack, since: int = 0) -> list[dict]:
    return HTTP.get(f"{stack.orchestrator_url}/v1/events", params={"since": since}).json()


@pytest.fixture(scope="module")
def smol(stack) -> dict:
    """SmolLM2 deployed once every node has calibrated it (so the first plan may use them all)."""
    key = "smollm2-135m"
    HTTP.post(
        f"{stack.monitor_url}/v1/profiles", json={"model": key}, headers=admin(stack)
    ).raise_for_status()

    def calibrated() -> bool:
        nodes = HTTP.get(f"{stack.monitor_url}/v1/nodes", params={"model": key}).json()
        return len([n for n in nodes if n["state"] == "alive" and n.get("flops_per_s")]) == len(NODES)

    wait_for(calibrated, 90, "every node calibrated")
    body = {"name": "smol", "model": key, "policy": {"cooldown_s": 4}}
    r = HTTP.post(f"{stack.orchestrator_url}/v1/deployments", json=body, headers=admin(stack))
    assert r.status_code == 201, r.text
    return wait_for(lambda: (d := deployment(stack, "smol"))["state"] == "ready" and d, 120, "smol ready")


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dashboard-shots")


@pytest.fixture(scope="module")
def page(stack, smol):
    """One Chromium showing the dashboard for the whole module (the tests run in file order)."""
    require_browser()
    driver = start_chromium()
    try:
        size(driver, 1280, 1000)
        driver.get(f"{stack.orchestrator_url}/")
        yield driver
    finally:
        stop_chromium(driver)


def size(driver, width: int, height: int) -> None:
    """Make the page's viewport exactly this size (a window cannot be made 390 px wide on every platform)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})  # fmt: skip


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def shown_ranges(driver, name: str) -> list[str]:
    """The plan bars of a deployment as "node start:end", sorted."""
    return sorted(js(driver, "return [...document.querySelectorAll(`[data-deployment='${arguments[0]}'] .seg`)]"
                             ".map(s => `${s.closest('.bar').dataset.node} ${s.textContent}`)", name))  # fmt: skip


def api_ranges(d: dict) -> list[str]:
    return sorted(f"{s['node']} {s['start']}:{s['end']}" for s in d["stages"])


def shown_version(driver, name: str) -> str | None:
    return js(driver, "const v = document.querySelector(`[data-deployment='${arguments[0]}'] .version`);"
                      "return v && v.textContent", name)  # fmt: skip


def test_the_event_stream_and_the_dashboard_routes_answer_as_documented(stack, smol) -> None:
    url = stack.orchestrator_url
    logged = events(stack)
    frames: list[dict] = []
    with httpx.stream("GET", f"{url}/v1/events/stream", params={"since": 0}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        ids = []
        for line in r.iter_lines():
            if line.startswith("id: "):
                ids.append(int(line[4:]))
            elif line.startswith("data: "):
                frames.append(json.loads(line[6:]))
            if len(frames) == len(logged):
                break
    assert ids == [e["id"] for e in logged] == [f["id"] for f in frames]
    assert frames[0] == logged[0]
    # A reconnecting EventSource resumes after the id it saw, whatever the URL says.
    with httpx.stream("GET", f"{url}/v1/events/stream", params={"since": 0},
                      headers={"last-event-id": str(logged[-2]["id"])}, timeout=30) as r:  # fmt: skip
        first = next(json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: "))
    assert first["id"] == logged[-1]["id"]

    cluster = HTTP.get(f"{url}/v1/cluster").json()
    assert [n["node_id"] for n in cluster["nodes"]] == NODES
    planned = {n["node_id"]: n["memory_planned_bytes"] for n in cluster["nodes"]}
    assert {s["node"] for s in smol["stages"]} == {n for n, b in planned.items() if b > 0}
    assert all(planned[n] <= 360_000_000 for n in NODES)  # the planner kept within what they offer
    assert "smollm2-135m" in cluster["models"]
    assert all(n["emulation"]["slowdown"] == 1.0 for n in cluster["nodes"])

    no_token = HTTP.post(f"{url}/v1/nodes/edge-2/emulation", json={"slowdown": 2.0})
    assert no_token.status_code == 401
    unknown = HTTP.post(f"{url}/v1/nodes/nope/emulation", json={"slowdown": 2.0}, headers=admin(stack))
    assert unknown.status_code == 404
    bad = HTTP.post(f"{url}/v1/nodes/edge-2/emulation", json={"slowdown": 0.5}, headers=admin(stack))
    assert bad.status_code == 422
    assert HTTP.get(f"{url}/dashboard/../app.py").status_code == 404
    assert HTTP.get(f"{url}/dashboard/app.py").status_code == 404
    assert HTTP.get(f"{url}/v1/rollouts/{smol['history'][-1]['version']}x").status_code == 404


def test_the_page_shows_every_node_the_deployment_and_its_plan_without_console_errors(page, stack) -> None:
    for node in NODES:
        wait_for(lambda n=node: js(page, f"return !!document.querySelector('#nodes [data-node=\"{n}\"]')"),
                 15, f"card of {node}")  # fmt: skip
    wait_for(lambda: shown_ranges(page, "smol") == api_ranges(deployment(stack, "smol")), 15,
             "the page's plan bars equal the API's stages")  # fmt: skip
    d = deployment(stack, "smol")
    assert shown_version(page, "smol") == f"v{d['version']}"
    n = len(NODES)
    wait_for(lambda: js(page, "return document.querySelectorAll('#links td[data-link]').length") == n * (n - 1),
             20, "every link measured and shown")  # fmt: skip
    timeline = js(page, "return [...document.querySelectorAll('#timeline li')].map(li => +li.dataset.id)")
    assert timeline and timeline == sorted(timeline, reverse=True)  # newest first
    assert "deploy" in js(
        page, "return [...document.querySelectorAll('#timeline li')].map(li => li.dataset.kind)"
    )
    unlabelled = js(page, "return [...document.querySelectorAll('input, select, textarea')]"
                          ".filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.id)")  # fmt: skip
    assert unlabelled == []
    assert console_errors(page) == []


def _load(stack, stop: threading.Event, answers: list) -> None:
    body = {
        "model": "smol",
        "temperature": 0,
        "max_tokens": 24,
        "messages": [{"role": "user", "content": CAPITAL}],
    }
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            r = client.post(f"{stack.orchestrator_url}/v1/chat/completions", json=body)
            answers.append(r.status_code)


def test_a_worker_slowed_from_the_page_shows_a_new_plan_and_a_resplit_within_15s(page, stack) -> None:
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    js(page, "window.__sameDocument = true")
    d = wait_for(lambda: (d := deployment(stack, "smol"))["state"] == "ready" and d, 30, "ready")
    time.sleep(5)  # past the cooldown of any earlier change
    d = deployment(stack, "smol")
    victim = max(d["stages"], key=lambda s: s["end"] - s["start"])["node"]
    since = events(stack)[-1]["id"]
    stop, answers = threading.Event(), []
    load = threading.Thread(target=_load, args=(stack, stop, answers))
    load.start()
    try:
        time.sleep(3)  # steps measured on the current plan, so the slowdown is seen in them too
        # Everything by keyboard: the token, then the emulation form, each sent with Enter.
        page.find_element("id", "admin-token").send_keys(stack.admin_token, Keys.ENTER)
        assert js(page, "return sessionStorage.getItem('edgeorch.adminToken')") == stack.admin_token
        assert js(page, "return localStorage.length") == 0
        Select(page.find_element("id", "emulation-node")).select_by_value(victim)
        slowdown = page.find_element("id", "emulation-slowdown")
        slowdown.clear()
        t0 = time.monotonic()
        slowdown.send_keys("4", Keys.ENTER)

        def changed() -> bool:
            now = deployment(stack, "smol")
            kinds = js(page, "return [...document.querySelectorAll('#timeline li')]"
                             ".filter(li => +li.dataset.id > arguments[0]).map(li => li.dataset.kind)", since)  # fmt: skip
            return (now["version"] > d["version"] and shown_version(page, "smol") == f"v{now['version']}"
                    and shown_ranges(page, "smol") == api_ranges(now) and bool({"resplit", "remap"} & set(kinds)))  # fmt: skip

        wait_for(changed, CHANGE_S, "a new plan in the bars and a re-split in the timeline", every_s=0.25)
        took = time.monotonic() - t0
    finally:
        stop.set()
        load.join()
    after = deployment(stack, "smol")
    print(f"slowed {victim} 4x from the page; new plan v{after['version']} {api_ranges(after)} shown "
          f"after {took:.1f} s (was v{d['version']} {api_ranges(d)}); {len(answers)} requests meanwhile")  # fmt: skip
    assert js(page, "return window.__sameDocument") is True  # no reload
    wait_for(lambda: js(page, f"return document.querySelector('[data-node=\"{victim}\"] .emulation')"
                              "?.dataset.slowdown") == "4", 5, "the node card shows the slowdown")  # fmt: skip
    assert "emulation of" in page.find_element("id", "admin-result").text
    assert set(answers) == {200}
    assert console_errors(page) == []


def test_a_chat_answer_streams_in_the_page_and_equals_the_apis(page, stack) -> None:
    from selenium.webdriver.support.ui import Select

    Select(page.find_element("id", "chat-model")).select_by_value("smol")
    for field, value in (("chat-max", "32"), ("chat-temperature", "0"), ("chat-prompt", CAPITAL)):
        box = page.find_element("id", field)
        box.clear()
        box.send_keys(value)
    # Count the answer's updates: one per streamed delta, not one at the end.
    js(page, "window.__updates = 0; new MutationObserver(() => window.__updates++)"
             ".observe(document.getElementById('chat-answer'), {childList: true, characterData: true, subtree: true})")  # fmt: skip
    page.find_element("id", "chat-send").click()
    wait_for(lambda: js(page, "return document.getElementById('chat-answer').dataset.state") == "done", 60,
             "the streamed answer")  # fmt: skip
    shown = js(page, "return document.getElementById('chat-answer').textContent")
    body = {
        "model": "smol",
        "temperature": 0,
        "max_tokens": 32,
        "messages": [{"role": "user", "content": CAPITAL}],
    }
    r = HTTP.post(f"{stack.orchestrator_url}/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert shown == r.json()["choices"][0]["message"]["content"] == "The capital of France is Paris."
    assert js(page, "return window.__updates") >= 5  # token by token
    assert "finish reason: stop" in page.find_element("id", "chat-state").text
    assert console_errors(page) == []


def test_screenshots_at_1280_and_390_px(page, stack, shots) -> None:
    wait_for(lambda: js(page, "return document.querySelectorAll('#chart-tokens polyline').length") > 0, 15,
             "the tokens/s chart drawn")  # fmt: skip
    out = os.environ.get("EDGEORCH_DASHBOARD_SHOTS")
    for width, height in ((1280, 1500), (390, 844)):
        size(page, width, height)
        js(page, "document.activeElement.blur(); window.scrollTo(0, 0)")
        time.sleep(1.0)  # a render at the new width (the page redraws on resize)
        assert js(page, "return window.innerWidth") == width
        # Usable at this width: nothing wider than the viewport, so no sideways scrolling of the page.
        assert js(page, "return document.documentElement.scrollWidth") <= width
        path = shots / f"dashboard-{width}.png"
        assert page.save_screenshot(str(path))
        assert path.stat().st_size > 10_000
        print(f"screenshot: {path}")
        if out:
            shutil.copy(path, Path(out) / path.name)
    size(page, 1280, 1000)
    assert console_errors(page) == []


def test_a_deployment_is_created_and_deleted_from_the_page(page, stack) -> None:
    from selenium.webdriver.support.ui import Select

    name = f"tiny-{uuid.uuid4().hex[:6]}"
    page.find_element("id", "deploy-name").send_keys(name)
    Select(page.find_element("id", "deploy-model")).select_by_value("tiny-llama")
    page.find_element("id", "deploy-create").click()
    wait_for(lambda: HTTP.get(f"{stack.orchestrator_url}/v1/deployments/{name}").status_code == 200, 30,
             "the deployment created")  # fmt: skip
    wait_for(lambda: js(page, f"return !!document.querySelector('#plans [data-deployment=\"{name}\"]')"), 10,
             "the deployment on the page")  # fmt: skip
    wait_for(lambda: name in [o.get_attribute("value") for o in Select(page.find_element("id", "delete-name")).options],
             10, "the deployment offered for deletion")  # fmt: skip
    Select(page.find_element("id", "delete-name")).select_by_value(name)
    page.find_element("id", "deploy-delete").click()
    wait_for(lambda: HTTP.get(f"{stack.orchestrator_url}/v1/deployments/{name}").status_code == 404, 30,
             "the deployment deleted")  # fmt: skip
    wait_for(lambda: not js(page, f"return !!document.querySelector('#plans [data-deployment=\"{name}\"]')"), 10,
             "the deployment gone from the page")  # fmt: skip
    assert console_errors(page) == []
