"""The monitor with real worker processes, real Redis and real SQL.

The workers calibrate the real SmolLM2 (one layer of it stands for all) and
probe each other's links; the tests change their emulated capacity and time
how long the monitor takes to say so.
"""

from __future__ import annotations

import math
import signal
import socket
import statistics
import subprocess
import time
import uuid

import httpx
import psycopg
import pytest

from edgeorch.local.chain import load_chain
from edgeorch.local.launcher import LocalService, LocalWorkers, free_port
from edgeorch.transport.client import ChainClient

MODEL = "smollm2-135m"


def wait_for(predicate, timeout_s: float, every_s: float = 0.1):
    """Poll until predicate() returns something truthy; return it, or fail after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"condition not met within {timeout_s}s")


def events(mon: LocalService, since: int = 0) -> list[dict]:
    return httpx.get(f"{mon.url}/v1/events", params={"since": since}).json()


def last_event_id(mon: LocalService) -> int:
    evs = events(mon)
    return evs[-1]["id"] if evs else 0


def find_event(mon, since: int, kind: str, node: str | None = None, pred=lambda e: True):
    def look():
        for e in events(mon, since):
            if e["kind"] == kind and (node is None or e["node_id"] == node) and pred(e):
                return e
        return None

    return look


def node_speed(mon: LocalService, node: str) -> float | None:
    return httpx.get(f"{mon.url}/v1/nodes/{node}", params={"model": MODEL}).json()["flops_per_s"]


def settled_speed(mon: LocalService, node: str, seconds: float = 2.0) -> float:
    """Median of the reported speed over a few heartbeats."""
    return settled_speeds(mon, [node], seconds)[0]


def settled_speeds(mon: LocalService, nodes: list[str], seconds: float = 2.0) -> list[float]:
    """Median of each node's reported speed, all sampled over the same seconds.

    Sampling them together matters when comparing nodes: this machine's own
    speed drifts by ±15 % over a few seconds, and nodes sampled one after the
    other would each see a different machine.
    """
    values: list[list[float]] = [[] for _ in nodes]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for vs, node in zip(values, nodes, strict=True):
            if v := node_speed(mon, node):
                vs.append(v)
        time.sleep(0.25)
    return [statistics.median(vs) for vs in values]


def settled_ratios(mon: LocalService, nodes: list[str], seconds: float) -> list[float]:
    """Median over the same seconds of each node's speed divided by the first node's, read together.

    Ratios taken at the same instant cancel what the machine's drift does to
    every node at once; their median over many heartbeats (each itself a
    median of 9 probes) averages out what it does to one node for a while.
    """
    ratios: list[list[float]] = [[] for _ in nodes[1:]]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        speeds = [node_speed(mon, n) for n in nodes]
        if all(speeds):
            for rs, v in zip(ratios, speeds[1:], strict=True):
                rs.append(speeds[0] / v)
        time.sleep(0.25)
    return [statistics.median(rs) for rs in ratios]


def start_monitor(
    tmp_path, db_url: str | None = None, redis_url: str = "redis://127.0.0.1:6379/0", port=None
):
    env = {
        "EDGEORCH_DATABASE_URL": db_url or f"sqlite:///{tmp_path / 'monitor.db'}",
        "EDGEORCH_REDIS_URL": redis_url,
    }
    mon = LocalService("monitor", ["monitor"], port or free_port(), env, tmp_path)
    mon.wait_healthy()
    return mon


def set_emulation(worker, **kw) -> None:
    httpx.post(f"{worker.url}/v1/admin/emulation", json=kw).raise_for_status()


@pytest.fixture(scope="module")
def cluster(store, tmp_path_factory):
    logs = tmp_path_factory.mktemp("monitor")
    mon = start_monitor(logs)
    httpx.post(f"{mon.url}/v1/profiles", json={"model": MODEL}).raise_for_status()
    workers = LocalWorkers(3, model_store=store.root, threads=1, log_dir=logs,
                           extra_env={"EDGEORCH_MONITOR_URL": mon.url})  # fmt: skip
    try:
        for i in range(3):
            wait_for(find_event(mon, 0, "profiled", f"worker-{i}"), 20)
        yield mon, workers
    finally:
        workers.stop()
        mon.stop()


def test_nodes_are_registered_calibrated_and_linked(cluster) -> None:
    mon, _ = cluster
    nodes = {n["node_id"]: n for n in httpx.get(f"{mon.url}/v1/nodes", params={"model": MODEL}).json()}
    assert set(nodes) == {"worker-0", "worker-1", "worker-2"}
    for n in nodes.values():
        assert n["state"] == "alive" and n["memory_bytes"] > 0 and n["flops_per_s"] > 0
        profile = n["profiles"][MODEL]
        assert {u["unit"] for u in profile["units"]} == {"embed", "layer0", "head"}
        assert profile["seconds_per_token_decode"] > 0
    links = wait_for(lambda: [lk for lk in httpx.get(f"{mon.url}/v1/links").json() if lk["rtt_s"]], 10)
    pairs = {(lk["src"], lk["dst"]) for lk in links}
    assert len(pairs) == 6  # every directed pair of three nodes
    assert httpx.get(f"{mon.url}/v1/nodes/nope").status_code == 404
    assert all(n["live"]["cpu_percent"] >= 0 and n["live"]["memory_free_bytes"] > 0 for n in nodes.values())
    # Each worker's measured RSS (from its /proc) reaches the monitor: a python + torch process is > 100 MB.
    assert all(n["live"]["rss_bytes"] > 100 << 20 for n in nodes.values())
    assert "edgeorch_monitor_heartbeats_total" in httpx.get(f"{mon.url}/metrics").text
    assert httpx.get(f"{mon.url}/readyz").status_code == 200


def _link_samples(mon: LocalService) -> dict[tuple[str, str], int]:
    return {(lk["src"], lk["dst"]): lk["samples"] for lk in httpx.get(f"{mon.url}/v1/links").json()}


def test_real_traffic_feeds_stage_times_and_link_samples(cluster) -> None:
    mon, workers = cluster
    ids = load_chain(workers, MODEL, [(0, 11), (11, 21), (21, 32)], prefix="mon")
    before = _link_samples(mon)
    steps = 24
    with ChainClient(workers.workers[0].url, ids[0]) as client:
        client.generate([1, 504, 3575, 282], steps)
    # The heartbeat after the traffic carries each stage's recent compute time.
    for i, stage in enumerate(ids):
        live = wait_for(lambda i=i, stage=stage: _live_stage_time(mon, f"worker-{i}", stage), 5)
        assert live > 0
    time.sleep(2.5)  # two heartbeats: every passive sample has been reported
    after = _link_samples(mon)
    for i, stage in enumerate(ids):
        httpx.delete(f"{workers.workers[i].url}/v1/stages/{stage}")
    # Each step adds a passive sample on the links the chain uses (0->1, 1->2) and none on
    # the other link out of the same node, which only the periodic probes feed (at the
    # same rate, counted in the same heartbeat).
    gained = {pair: after[pair] - before.get(pair, 0) for pair in after}
    print(f"link samples gained during {steps} steps: {gained}")
    for used, unused in ((("worker-0", "worker-1"), ("worker-0", "worker-2")),
                         (("worker-1", "worker-2"), ("worker-1", "worker-0"))):  # fmt: skip
        assert gained[used] - gained[unused] >= steps - 2, (used, gained)


def _live_stage_time(mon, node: str, stage: str) -> float | None:
    return httpx.get(f"{mon.url}/v1/nodes/{node}").json()["live"].get("stage_compute_s", {}).get(stage)


def test_heterogeneous_nodes_get_speeds_in_their_ratios(cluster) -> None:
    mon, workers = cluster
    for w, k in zip(workers.workers, (1.0, 2.0, 4.0), strict=True):
        set_emulation(w, slowdown=k)
    try:
        time.sleep(3.0)  # let the probe windows fill with samples at the new speeds
        r2, r4 = settled_ratios(mon, [f"worker-{i}" for i in range(3)], seconds=16.0)
    finally:
        for w in workers.workers:
            set_emulation(w, slowdown=1.0)
    print(f"speed ratios 1x/2x {r2:.2f}, 1x/4x {r4:.2f}")
    # The slowdown is real waiting (runtime/emulation.py), and a 2 ms probe's wake-ups on a
    # loaded host are late by a good part of it, which makes a slowed node read slower still
    # (a full CI run once read 1x/4x at 5.54). So: at most 35 % under the ratio, at most 50 %
    # over it. That still tells 1x, 2x and 4x apart, and a node whose wait did not happen
    # (ratio 1) fails.
    assert 0.65 * 2.0 <= r2 <= 1.5 * 2.0
    assert 0.65 * 4.0 <= r4 <= 1.5 * 4.0


def test_slowdown_is_reported_promptly_and_measured_within_35pct(cluster) -> None:
    mon, workers = cluster
    time.sleep(3.0)  # recover from earlier emulation
    # worker-0 and worker-2 are never slowed: they measure the machine's own
    # drift between "before" and "after", which alone reaches ±15 % here.
    # Against the two of them (geometric mean) that drift weighs less than
    # against one: CI once read 0.30 against worker-0 alone.
    nodes = ["worker-1", "worker-0", "worker-2"]

    def relative_speed() -> float:
        r0, r2 = settled_ratios(mon, nodes, seconds=8.0)  # worker-1 ÷ each reference, read together
        return math.sqrt(r0 * r2)

    before = relative_speed()
    since = last_event_id(mon)
    t0 = time.time()
    set_emulation(workers.workers[1], slowdown=4.0)
    try:
        event = wait_for(
            find_event(mon, since, "speed_changed", "worker-1", lambda e: e["data"]["ratio"] < 0.7), 10
        )
        time.sleep(3.0)  # let the probe window fill with samples at the new speed
        after = relative_speed()
    finally:
        set_emulation(workers.workers[1], slowdown=1.0)
    print(
        f"4x slowdown reported after {event['ts'] - t0:.2f}s, measured at {after / before:.3f} of its earlier speed"
    )
    # 1.25-2.18 s on an idle machine (5 probes of 0.25 s turn a median of 9 over, then a
    # heartbeat); 6 s is what two busy cores cannot break and still well inside a cooldown.
    assert event["ts"] - t0 <= 6.0, f"reported after {event['ts'] - t0:.2f}s"
    assert after / before == pytest.approx(1 / 4, rel=0.35)  # real waiting: see the ratios test


def test_link_paced_to_20_mbit_is_measured_and_reported(cluster) -> None:
    mon, workers = cluster
    since = last_event_id(mon)
    t0 = time.time()
    set_emulation(workers.workers[2], bandwidth_mbps=20)
    try:
        event = wait_for(find_event(mon, since, "link_changed", "worker-2",
                                    lambda e: "new_bandwidth_bytes_per_s" in e["data"]), 12)  # fmt: skip
        time.sleep(2.0)
        links = httpx.get(f"{mon.url}/v1/links").json()
    finally:
        set_emulation(workers.workers[2])
    out = [lk["bandwidth_bytes_per_s"] for lk in links if lk["src"] == "worker-2"]
    print(
        f"20 Mbit/s link reported after {event['ts'] - t0:.2f}s, measured {[round(b * 8e-6, 1) for b in out]} Mbit/s"
    )
    assert event["ts"] - t0 <= 10.0, f"reported after {event['ts'] - t0:.2f}s"  # 2.1-2.8 s idle
    assert len(out) == 2
    for bw in out:
        assert bw == pytest.approx(20e6 / 8, rel=0.2)


def test_an_uplink_rtt_jump_is_remeasured_on_every_outgoing_link_at_once(cluster) -> None:
    mon, workers = cluster

    def out_of_2() -> list[float | None]:
        return [lk["rtt_s"] for lk in httpx.get(f"{mon.url}/v1/links").json() if lk["src"] == "worker-2"]

    assert len(out_of_2()) == 2
    log_start = workers.workers[2].log_path.stat().st_size
    t0 = time.monotonic()
    set_emulation(workers.workers[2], rtt_ms=150)
    try:
        # One jumped probe sets off a burst of probes to every peer, so both
        # medians turn over together instead of one sample per 0.5 s round.
        wait_for(lambda: all(r and r >= 0.13 for r in out_of_2()), 12)
        took = time.monotonic() - t0
    finally:
        set_emulation(workers.workers[2])
    print(f"150 ms RTT on worker-2's uplink measured on both its links after {took:.2f}s")
    # The burst, not the normal rounds, turned both medians over: the worker says it re-measured
    # both links (the time alone, 1.3 s with the burst and 3.9 s without on an idle machine,
    # cannot tell them apart on two busy cores).
    with open(workers.workers[2].log_path, "rb") as f:
        f.seek(log_start)
        assert b"re-measuring the RTT of 2 links" in f.read()
    assert took <= 8.0, f"both links measured after {took:.2f}s"
    wait_for(lambda: all(r and r < 0.05 for r in out_of_2()), 6)  # and back, for the tests after this one


def test_killed_worker_is_lost_promptly_and_a_new_one_joins_and_is_profiled(cluster) -> None:
    mon, workers = cluster
    since = last_event_id(mon)
    t_kill = time.time()
    workers.workers[0].stop(signal.SIGKILL)
    lost = wait_for(find_event(mon, since, "node_lost", "worker-0"), 10)
    # Lost after 2 s without a heartbeat (1.1-1.9 s idle, the last beat being up to 1 s old).
    assert lost["ts"] - t_kill <= 5.0, f"lost after {lost['ts'] - t_kill:.2f}s"
    workers.add_worker("worker-new", wait=True)
    t_join = time.time()  # the node is up (its imports done); from here it must be seen and calibrated
    joined = wait_for(find_event(mon, since, "node_joined", "worker-new"), 20)
    profiled = wait_for(find_event(mon, since, "profiled", "worker-new"), 25)
    print(
        f"lost after {lost['ts'] - t_kill:.2f}s; joined {joined['ts'] - t_join:.2f}s and profiled "
        f"{profiled['ts'] - t_join:.2f}s after the new worker was up"
    )
    assert joined["ts"] - t_join <= 20.0 and profiled["ts"] - t_join <= 20.0  # 0 and 2 s idle
    nodes = {n["node_id"]: n["state"] for n in httpx.get(f"{mon.url}/v1/nodes").json()}
    assert nodes["worker-0"] == "lost" and nodes["worker-new"] == "alive"
    # Links to the lost node are no longer offered to planners.
    assert all("worker-0" not in (lk["src"], lk["dst"]) for lk in httpx.get(f"{mon.url}/v1/links").json())


def _start_redis(port: int, tmp_path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_redis_outage_stops_nothing_and_loses_no_registration(store, tmp_path) -> None:
    port = free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    redis = _start_redis(port, tmp_path)
    wait_for(lambda: _redis_up(port), 10)
    mon = start_monitor(tmp_path, redis_url=redis_url)
    env = {"EDGEORCH_MONITOR_URL": mon.url, "EDGEORCH_REDIS_URL": redis_url}
    workers = LocalWorkers(2, model_store=store.root, threads=1, log_dir=tmp_path, extra_env=env)
    try:
        wait_for(lambda: len(httpx.get(f"{mon.url}/v1/nodes", params={"state": "alive"}).json()) == 2, 10)
        redis.kill()
        redis.wait()
        wait_for(lambda: httpx.get(f"{mon.url}/readyz").status_code == 503, 5)
        time.sleep(10)
        for p in (mon, *workers.workers):
            assert p.proc.poll() is None, f"{p.name} exited during the outage"
        nodes = httpx.get(f"{mon.url}/v1/nodes").json()
        assert {n["node_id"]: n["state"] for n in nodes} == {"worker-0": "alive", "worker-1": "alive"}
        redis = _start_redis(port, tmp_path)
        wait_for(lambda: httpx.get(f"{mon.url}/readyz").status_code == 200, 10)
        seen = {n["node_id"]: n["last_seen"] for n in httpx.get(f"{mon.url}/v1/nodes").json()}
        time.sleep(2.5)
        again = {n["node_id"]: n["last_seen"] for n in httpx.get(f"{mon.url}/v1/nodes").json()}
        assert all(again[k] > seen[k] for k in seen), "heartbeats resumed"
    finally:
        workers.stop()
        mon.stop()
        redis.kill()


def _redis_up(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_monitor_restart_keeps_registrations_and_events(store, tmp_path, backend) -> None:
    db_url, dbname = None, None
    if backend == "postgresql":
        dbname = f"edgeorch_test_{uuid.uuid4().hex[:8]}"
        with psycopg.connect("postgresql://root@127.0.0.1:5432/test", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {dbname}")
        db_url = f"postgresql://root@127.0.0.1:5432/{dbname}"
    port = free_port()
    mon = start_monitor(tmp_path, db_url=db_url, port=port)
    workers = LocalWorkers(1, model_store=store.root, threads=1, log_dir=tmp_path,
                           extra_env={"EDGEORCH_MONITOR_URL": mon.url})  # fmt: skip
    try:
        wait_for(find_event(mon, 0, "node_joined", "worker-0"), 10)
        mon.stop()
        mon = start_monitor(tmp_path, db_url=db_url, port=port)
        assert [e["kind"] for e in events(mon)][:1] == ["node_joined"]
        node = httpx.get(f"{mon.url}/v1/nodes/worker-0").json()
        assert node["url"] == workers.workers[0].url
        # The worker keeps heartbeating into the restarted monitor: it stays alive.
        time.sleep(3)
        assert httpx.get(f"{mon.url}/v1/nodes/worker-0").json()["state"] == "alive"
    finally:
        workers.stop()
        mon.stop()
        if dbname:
            with psycopg.connect("postgresql://root@127.0.0.1:5432/test", autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
