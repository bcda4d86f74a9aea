"""Rollouts with real workers, a real broadcast process, real Redis and real SQL (DESIGN.md §6.3).

1. a cutover under load (SmolLM2, 4 sessions) loses no request and changes no text;
2. a worker killed during PREPARE aborts the rollout, the old version keeps answering;
3. a worker cut off from Redis, or down and restarted, converges through its pull loop;
4. forged, tampered, stale, expired and replayed messages change nothing;
5. a rollout that moves one unit reads only that unit from the checkpoint.

The SmolLM2 tests keep the broadcast state in SQLite, the tiny-model tests in PostgreSQL.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
from transformers import AutoTokenizer

from edgeorch.engine import load_adapter
from edgeorch.engine.stage import unit_loader
from edgeorch.local.launcher import LocalService
from edgeorch.rollout.signing import new_message, sign
from edgeorch.service import bus
from tests.integration.rollout_helpers import (
    REDIS_URL,
    PgSchema,
    SessionLoop,
    generate,
    held,
    metric,
    pauses,
    start_rig,
    unique,
    wait_for,
    worker_env,
)
from tests.support import ServiceProcess

SMOL = "smollm2-135m"  # 32 units: 0 embedding, 1..30 layers, 31 head
TINY = "tiny-llama"  # 6 units
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "How do I boil an egg?",
]
NEW_TOKENS = 32


# ----- SmolLM2: cutover under load, and a rollout that moves one unit ------------------------------


@pytest.fixture(scope="module")
def smol(store, tmp_path_factory):
    """Four workers; a deployment on the first three; the undisturbed reference answers."""
    rig = start_rig(tmp_path_factory.mktemp("smol"), 4)
    try:
        a, b, c, _ = rig.workers.workers
        name = unique("smol")
        first = rig.wait_phase(rig.rollout(name, SMOL, [(a, 0, 11), (b, 11, 21), (c, 21, 32)])["id"])
        assert first["phase"] == "completed", first
        tok = AutoTokenizer.from_pretrained(str(store.path(SMOL)))
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           return_dict=True)["input_ids"] for p in PROMPTS]  # fmt: skip
        entry = rig.deployment(name)["entry"]
        with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent but undisturbed: no rollout yet
            reference = list(pool.map(lambda p: generate(entry, p, NEW_TOKENS), prompts))
        yield rig, name, prompts, reference, first
    finally:
        rig.workers.stop()
        rig.broadcast.kill()


@pytest.mark.slow
def test_cutover_under_load_fails_nothing_and_changes_no_text(smol, tmp_path) -> None:
    rig, name, prompts, reference, _ = smol
    a, b, _, d = rig.workers.workers
    start_version = rig.deployment(name)["active_version"]
    loop = SessionLoop(rig.url, name, prompts, NEW_TOKENS, secret=rig.secret)
    loop.start()
    try:
        wait_for(
            lambda: loop.every_session(lambda r: True), 120, "a generation per session before the rollout"
        )
        # Other ranges on every stage, and node c swapped for d.
        started = rig.rollout(name, SMOL, [(a, 0, 9), (b, 9, 23), (d, 23, 32)])
        done = rig.wait_phase(started["id"], timeout_s=120)
        assert done["phase"] == "completed", done
        new_version = done["version"]
        wait_for(lambda: loop.every_session(lambda r: r.version == new_version and r.started > done["committed_at"]),
                 120, "a generation per session on the new version")  # fmt: skip
    finally:
        loop.join()

    assert loop.failures == [], loop.failures
    for run in loop.runs:
        assert run.tokens == reference[run.session], f"session {run.session} on v{run.version}"
    assert {r.version for r in loop.runs} == {start_version, new_version}
    in_flight = [r for r in loop.runs if r.version == start_version and r.times[-1] > done["committed_at"]]
    assert in_flight, "no session was in flight across the commit"
    assert {x["node_id"]: x["ok"] for x in done["acks"]} == {a.name: True, b.name: True, d.name: True}
    wait_for(lambda: rig.converged(name, new_version), 30, "the old version released on every worker")

    report = {
        **pauses(loop.runs, (done["created_at"], done["finished_at"])),
        "sessions": len(prompts), "new_tokens": NEW_TOKENS, "generations": len(loop.runs),
        "generations_in_flight_across_commit": len(in_flight), "failed_requests": len(loop.failures),
        "prepare_s": done["prepare_s"], "commit_s": done["commit_s"],
        "drain_s": done["finished_at"] - done["committed_at"],
        "acks": {x["node_id"]: {"prepare_s": x["prepare_s"], "bytes_read": x["bytes_read"]} for x in done["acks"]},
        "model": SMOL, "from": "0:11,11:21,21:32 on a,b,c", "to": "0:9,9:23,23:32 on a,b,d",
    }  # fmt: skip
    print("\nrollout under load:", json.dumps(report, indent=1))
    # Tests write only to temporary paths; the figures docs/design.md quotes are a run
    # kept on purpose: EDGEORCH_ROLLOUT_REPORT=bench/results/rollout_pause.json.
    out = Path(os.environ.get("EDGEORCH_ROLLOUT_REPORT") or tmp_path / "rollout_pause.json")
    out.write_text(json.dumps(report, indent=1) + "\n")


def _unit_bytes(model_dir, u: int) -> int:
    """The bytes a worker reads for unit ``u`` of a default (lean fp32) stage: its packed unit file
    where `make models` packed fp32, else its tensors in the checkpoint."""
    load, reader = unit_loader(model_dir, load_adapter(model_dir, "lean", "fp32"))
    load(u)
    return reader.bytes_read


@pytest.mark.slow
def test_moving_one_unit_reads_only_that_unit(store, smol) -> None:
    rig, name, prompts, reference, first = smol
    dep = rig.deployment(name)
    wait_for(lambda: rig.converged(name, dep["active_version"]), 30, "no older version still loaded")
    stages = dep["stages"]
    moved = stages[1]["start"]  # the first unit of stage 1 moves to stage 0's node
    plan = [(rig.node(s["node"]), s["start"], s["end"]) for s in stages]
    plan[0] = (plan[0][0], 0, moved + 1)
    plan[1] = (plan[1][0], moved + 1, plan[1][2])
    done = rig.wait_phase(rig.rollout(name, SMOL, plan)["id"])
    assert done["phase"] == "completed", done

    read = {x["node_id"]: x["bytes_read"] for x in done["acks"]}
    expected = _unit_bytes(store.path(SMOL), moved)
    full_load = sum(x["bytes_read"] for x in first["acks"])
    assert read[stages[0]["node"]] == expected  # exactly the moved unit's tensors
    assert sum(read.values()) == expected  # every other unit was shared, not reloaded
    assert full_load > 20 * expected
    print(f"\nmoved unit {moved}: {sum(read.values())} bytes read vs {full_load} for the full load")
    assert generate(rig.deployment(name)["entry"], prompts[0], NEW_TOKENS) == reference[0]


# ----- tiny model on PostgreSQL: a worker dying in PREPARE, forged messages, pulling workers ------


@pytest.fixture(scope="module")
def tiny(store, tmp_path_factory):
    schema = PgSchema()
    rig = None
    try:
        # A probe waits up to 60 s, longer than the prepare timeout: a worker that is stopped
        # (SIGSTOP: its socket accepts, nothing answers) is never declared dead by timeouts,
        # only one whose socket is gone refuses the probes (test_a_worker_killed_...).
        rig = start_rig(tmp_path_factory.mktemp("tiny"), 3, db_url=schema.url,
                        EDGEORCH_PREPARE_TIMEOUT_S="20", EDGEORCH_PROBE_TIMEOUT_S="60")  # fmt: skip
        yield rig
    finally:
        if rig is not None:
            rig.workers.stop()
            rig.broadcast.kill()
        schema.drop()


def _tiny_v1(rig) -> tuple[str, list[int]]:
    a, b, c = rig.workers.workers[:3]
    name = unique("tiny")
    done = rig.wait_phase(rig.rollout(name, TINY, [(a, 0, 2), (b, 2, 4), (c, 4, 6)])["id"])
    assert done["phase"] == "completed", done
    return name, generate(rig.deployment(name)["entry"], [1, 50, 60, 70], 12)


def test_a_worker_killed_during_prepare_aborts_and_the_old_version_keeps_answering(tiny) -> None:
    rig = tiny
    name, expected = _tiny_v1(rig)
    a, b = rig.workers.workers[:2]
    late = rig.workers.add_worker(unique("late"), wait=True)
    late.proc.send_signal(signal.SIGSTOP)  # alive but unable to prepare
    rollout = rig.rollout(name, TINY, [(a, 0, 3), (b, 3, 5), (late, 5, 6)])
    wait_for(lambda: len(rig.get(rollout["id"])["acks"]) >= 2 or rig.get(rollout["id"])["phase"] != "preparing",
             10, "the two live workers acking")  # fmt: skip
    # A second rollout is refused with a kind the orchestrator's client reads (it waits on this one only).
    plan = {"model": TINY, "stages": [{"node": a.name, "url": a.url, "start": 0, "end": 6}]}
    busy = httpx.post(f"{rig.url}/v1/rollouts", json={"deployment": name, "plan": plan}, timeout=30)
    assert busy.status_code == 409 and busy.json()["kind"] == "rollout_in_flight", busy.text
    assert generate(rig.deployment(name)["entry"], [1, 50, 60, 70], 12) == expected  # v1 serves meanwhile
    # Stopped, the late worker holds the rollout in PREPARE: nothing aborts it yet
    # (4 s: with probes that time out after 1 s, two failures would have aborted it by now).
    time.sleep(4.0)
    assert rig.get(rollout["id"])["phase"] == "preparing"
    t_kill = time.time()
    late.proc.send_signal(signal.SIGKILL)
    late.proc.wait()

    done = rig.wait_phase(rollout["id"], timeout_s=25)
    assert done["phase"] == "aborted", done
    assert late.name in done["reason"] and "unreachable" in done["reason"]
    # Because of the kill: two refused probes 0.5 s apart, long before the 20 s prepare timeout.
    assert done["finished_at"] - t_kill < 6, done["finished_at"] - t_kill
    assert rig.deployment(name)["active_version"] == 1
    assert generate(rig.deployment(name)["entry"], [1, 50, 60, 70], 12) == expected
    wait_for(lambda: rig.converged(name, 1), 10, "the aborted version's stages unloaded")
    assert 'outcome="aborted"' in httpx.get(f"{rig.url}/metrics").text


def test_forged_and_replayed_messages_change_nothing(tiny) -> None:
    rig = tiny
    workers = rig.workers.workers[:3]
    a, b, c = workers
    name = unique("sig")
    captured: list[dict] = []
    sub = _listen(name, captured)
    for plan in ([(a, 0, 2), (b, 2, 4), (c, 4, 6)], [(b, 0, 3), (c, 3, 5), (a, 5, 6)]):
        assert rig.wait_phase(rig.rollout(name, TINY, plan)["id"])["phase"] == "completed"
    wait_for(lambda: rig.converged(name, 2), 10, "version 2 everywhere")
    wait_for(lambda: len(captured) >= 6, 5, "prepare, commit and release of both versions captured")
    before = {w.name: held(w, name) for w in workers}
    accepted = {
        w.name: metric(w, "edgeorch_worker_rollout_messages_total", result="accepted") for w in workers
    }
    expected = generate(rig.deployment(name)["entry"], [1, 50, 60], 8)

    by_kind = {(m["kind"], m["version"]): m for m in captured}
    now = time.time()
    fake = {"kind": "prepare", "deployment": name, "version": 3, "rollout_id": "forged", "issued_at": now,
            "nonce": "f" * 32}  # fmt: skip
    hostile = [
        fake,  # unsigned
        sign(fake, "not-the-secret"),  # forged
        {**by_kind[("commit", 2)], "version": 3},  # tampered after signing
        by_kind[("prepare", 1)],  # replayed
        by_kind[("release", 2)],  # replayed
        new_message("prepare", name, 1, "old", rig.secret),  # properly signed but stale
        new_message("prepare", name, 3, "late", rig.secret, now=now - 3600),  # properly signed but expired
    ]
    publisher = redis.Redis.from_url(REDIS_URL)
    for msg in hostile:
        publisher.publish(bus.ROLLOUTS, json.dumps(msg))
    publisher.publish(bus.ROLLOUTS, b"not json at all")
    sub.close()

    reasons = ("unsigned", "bad signature", "replayed", "stale", "expired", "not a JSON object")
    for w in workers:
        wait_for(lambda w=w: _logged_rejections(w, reasons), 10, f"{w.name} logging why it rejected each")
        assert metric(w, "edgeorch_worker_rollout_messages_total", result="accepted") == accepted[w.name]
        assert metric(w, "edgeorch_worker_rollout_messages_total", result="bad signature") >= 2
    time.sleep(1.5)  # at least one more pull: still nothing changes
    assert {w.name: held(w, name) for w in workers} == before
    assert rig.deployment(name)["active_version"] == 2
    assert [
        r["version"] for r in httpx.get(f"{rig.url}/v1/rollouts", params={"deployment": name}).json()
    ] == [2, 1]
    assert generate(rig.deployment(name)["entry"], [1, 50, 60], 8) == expected

    # Acks are signed too: a forged one is refused before it is read.
    forged_ack = {"rollout_id": "x", "node_id": a.name, "ok": False}
    resp = httpx.post(
        f"{rig.url}/v1/rollouts/x/acks", json=forged_ack, headers={"x-edgeorch-signature": "00"}
    )
    assert resp.status_code == 401


def _logged_rejections(worker: LocalService, reasons: tuple[str, ...]) -> bool:
    lines = [line for line in worker.log_tail(1_000_000).splitlines() if "rejected rollout message" in line]
    return all(any(f": {r}" in line for line in lines) for r in reasons)


def _listen(deployment: str, out: list[dict]):
    """Subscribe to the rollout channel; a thread appends ``deployment``'s messages to ``out``. Close it after."""
    sub = redis.Redis.from_url(REDIS_URL).pubsub(ignore_subscribe_messages=True)
    sub.subscribe(bus.ROLLOUTS)
    threading.Thread(target=_capture, args=(sub, deployment, out), daemon=True).start()
    return sub


def _capture(sub, deployment: str, out: list[dict]) -> None:
    try:
        for raw in sub.listen():
            msg = json.loads(raw["data"])
            if msg.get("deployment") == deployment:
                out.append(msg)
    except Exception:  # the subscription is closed at the end of the test
        pass


def test_notifications_wake_only_the_nodes_a_rollout_touches(tiny) -> None:
    """Each message names the new and the old version's nodes; any other worker verifies it and sleeps on."""
    rig = tiny
    a, b, c = rig.workers.workers[:3]
    name = unique("addr")
    captured: list[dict] = []
    sub = _listen(name, captured)
    try:
        accepted = metric(c, "edgeorch_worker_rollout_messages_total", result="accepted")
        ignored = metric(c, "edgeorch_worker_rollout_messages_total", result="not_addressed")
        assert rig.wait_phase(rig.rollout(name, TINY, [(a, 0, 2), (b, 2, 6)])["id"])["phase"] == "completed"
        wait_for(lambda: len(captured) >= 3, 10, "prepare, commit and release of version 1")
        assert [m["kind"] for m in captured] == ["prepare", "commit", "release"], captured
        assert all(m["nodes"] == sorted([a.name, b.name]) for m in captured), captured
        wait_for(lambda: metric(c, "edgeorch_worker_rollout_messages_total", result="not_addressed") >= ignored + 3,
                 10, "the untouched worker verifying the three messages")  # fmt: skip
        assert metric(c, "edgeorch_worker_rollout_messages_total", result="accepted") == accepted
        assert held(c, name) == set()

        # Version 2 leaves a: its messages name a too, or a would keep version 1 until its next timed pull.
        del captured[:]
        assert rig.wait_phase(rig.rollout(name, TINY, [(b, 0, 3), (c, 3, 6)])["id"])["phase"] == "completed"
        wait_for(lambda: len(captured) >= 3, 10, "prepare, commit and release of version 2")
        assert all(m["nodes"] == sorted([a.name, b.name, c.name]) for m in captured), captured
        wait_for(lambda: rig.converged(name, 2), 10, "version 2 everywhere, version 1 released on a")
        assert metric(c, "edgeorch_worker_rollout_messages_total", result="accepted") >= accepted + 3
    finally:
        sub.close()


def test_workers_that_missed_messages_or_restarted_converge_by_pulling(tiny, tmp_path) -> None:
    rig = tiny
    a, b = rig.workers.workers[:2]
    # A worker whose Redis is unreachable never hears a notification.
    dead_redis = "redis://127.0.0.1:9/0"
    cut = rig.workers.add_worker("cut-off", env={**worker_env(rig.url, rig.secret, EDGEORCH_REDIS_URL=dead_redis)},
                                 wait=True)  # fmt: skip
    name = unique("pull")
    v1 = rig.wait_phase(rig.rollout(name, TINY, [(a, 0, 2), (b, 2, 4), (cut, 4, 6)])["id"])
    assert v1["phase"] == "completed" and {x["node_id"] for x in v1["acks"]} == {a.name, b.name, cut.name}
    expected = generate(rig.deployment(name)["entry"], [1, 50, 60, 70], 12)
    v2 = rig.wait_phase(rig.rollout(name, TINY, [(a, 0, 3), (cut, 3, 5), (b, 5, 6)])["id"])
    assert v2["phase"] == "completed", v2
    wait_for(lambda: held(cut, name) == {f"{name}.v2.s1"}, 10, "the cut-off worker dropping v1 by pulling")
    assert metric(cut, "edgeorch_worker_rollout_messages_total", result="accepted") == 0
    assert metric(cut, "edgeorch_worker_rollout_reconciles_total", result="ok") > 0
    assert generate(rig.deployment(name)["entry"], [1, 50, 60, 70], 12) == expected

    # The same worker goes down right after a COMMIT, misses the RELEASE, and comes back empty.
    v3 = rig.rollout(name, TINY, [(a, 0, 2), (b, 2, 4), (cut, 4, 6)])
    rig.wait_phase(v3["id"], phases=("committed", "completed", "aborted"))
    cut.proc.send_signal(signal.SIGKILL)
    cut.proc.wait()
    assert rig.wait_phase(v3["id"])["phase"] == "completed"
    (tmp_path / "restarted").mkdir()
    back = LocalService("cut-off", ["worker"], cut.port,
                        {**worker_env(rig.url, rig.secret, EDGEORCH_REDIS_URL=dead_redis),
                         "EDGEORCH_NODE_ID": "cut-off", "EDGEORCH_ADVERTISE_URL": cut.url}, tmp_path / "restarted")  # fmt: skip
    rig.workers.workers.append(back)
    back.wait_healthy()
    wait_for(lambda: held(back, name) == {f"{name}.v3.s2"}, 30, "the restarted worker loading its v3 stage")
    assert rig.converged(name, 3)
    assert generate(rig.deployment(name)["entry"], [1, 50, 60, 70], 12) == expected

    # The broadcast's own state is durable: a restarted service answers the same.
    port, env = rig.broadcast.port, rig.env
    rig.broadcast.kill()
    rig.broadcast = ServiceProcess(["broadcast"], port, env, tmp_path / "broadcast-restarted.log")
    rig.broadcast.wait_ready()
    assert rig.get(v3["id"])["phase"] == "completed"
    assert rig.deployment(name)["active_version"] == 3
    assert httpx.get(f"{rig.url}/readyz").json()["status"] == "ready"
