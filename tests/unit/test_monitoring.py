"""Estimators and change detection of the monitor, with a hand-driven clock."""

from __future__ import annotations

import pytest

from edgeorch.monitoring.cluster import PROVISIONAL_MAX_S, ClusterState, Thresholds, UnknownNode
from edgeorch.monitoring.estimators import (
    LinkEstimator,
    RollingMedian,
    bandwidth_changed,
    rtt_changed,
    rtt_jumped,
)
from edgeorch.schemas.monitor import Heartbeat, LinkSample, NodeCapacity, Registration, SpeedSample

CAP = NodeCapacity(cores=2, memory_bytes=8 << 30, trusted=True, watts=7.5)


def _hb(**kw) -> Heartbeat:
    return Heartbeat(cpu_percent=10, memory_free_bytes=1 << 30, queue_depth=0, sessions=0, **kw)


def _speed(flops: float) -> dict[str, SpeedSample]:
    return {"m": SpeedSample(decode_flops_per_s=flops, samples=5)}


def test_rolling_median_ignores_a_minority_of_outliers() -> None:
    m = RollingMedian(5)
    assert m.value() is None
    for v in (10, 10, 10, 500, 0.1):
        m.add(v)
    assert m.value() == 10
    for v in (2.5, 2.5, 2.5):  # a real change takes over once it is the majority
        m.add(v)
    assert m.value() == 2.5


def test_link_estimator_separates_rtt_and_bandwidth() -> None:
    est = LinkEstimator()
    for _ in range(3):
        est.add(64, 0.010)  # small probes: the RTT
        est.add(250_000, 0.010 + 0.1)  # 250 kB in 100 ms on top of the RTT: 2.5 MB/s
    assert est.rtt.value() == pytest.approx(0.010)
    assert est.bandwidth.value() == pytest.approx(2.5e6)
    # A large transfer hidden in the noise only bounds the bandwidth from below.
    fast = LinkEstimator()
    fast.add(64, 0.001)
    fast.add(100_000, 0.0012)
    assert fast.bandwidth.value() == pytest.approx(100_000 / 0.004)
    assert fast.resolvable_bytes_per_s == pytest.approx(100_000 / 0.004)


@pytest.mark.parametrize(
    ("old", "new", "resolvable", "changed"),
    [
        (100e6, 2.5e6, 500e6, True),  # loopback to 20 Mbit/s
        (2.5e6, 2.0e6, 500e6, False),  # 20 % is inside the threshold
        (2.5e6, 1.2e6, 500e6, True),
        (600e6, 900e6, 500e6, False),  # both beyond what the probe resolves
        (100e6, 200e6, 5e9, False),  # 64 KiB changes by 0.3 ms: noise to a planner
    ],
)
def test_bandwidth_change_rule(old, new, resolvable, changed) -> None:
    assert bandwidth_changed(old, new, 0.3, resolvable) is changed


def test_rtt_change_needs_relative_and_absolute_size() -> None:
    assert rtt_changed(0.001, 0.0025, 0.5) is False  # 150 % but only 1.5 ms
    assert rtt_changed(0.010, 0.030, 0.5) is True
    assert rtt_changed(0.100, 0.120, 0.5) is False


@pytest.mark.parametrize(
    ("median", "sample", "jumped"),
    [
        (None, 0.2, False),
        (0.001, 0.151, True),
        (0.151, 0.001, True),  # an uplink degraded, then restored
        (0.001, 0.008, False),  # loopback noise: 8x, but 7 ms
        (0.150, 0.165, False),
        (0.150, 0.290, False),  # a slow link's jitter: under 2x
        (0.020, 0.045, True),
    ],  # fmt: skip
)
def test_an_rtt_jump_needs_a_factor_of_two_and_10_ms(median, sample, jumped) -> None:
    assert rtt_jumped(median, sample) is jumped


def test_join_lose_return() -> None:
    c = ClusterState(Thresholds(lost_after_s=2.0))
    reg = Registration(node_id="a", url="http://127.0.0.1:1", capacity=CAP)
    assert [e.kind for e in c.register(reg, now=0.0)] == ["node_joined"]
    assert c.register(reg, now=0.5) == []  # a refresh is not news
    assert c.sweep(now=2.4) == []
    assert [e.kind for e in c.sweep(now=2.6)] == ["node_lost"]
    assert c.sweep(now=5.0) == []  # lost once, reported once
    assert [e.kind for e in c.heartbeat("a", _hb(), now=6.0)] == ["node_returned"]
    with pytest.raises(UnknownNode):
        c.heartbeat("ghost", _hb(), now=6.0)


def test_speed_change_is_reported_once_past_the_threshold() -> None:
    c = ClusterState(Thresholds(speed_rel=0.3))
    c.register(Registration(node_id="a", url="u", capacity=CAP), now=0)
    assert c.heartbeat("a", _hb(speeds=_speed(1e9)), now=1) == []  # sets the baseline
    assert c.heartbeat("a", _hb(speeds=_speed(0.8e9)), now=2) == []  # inside the threshold
    events = c.heartbeat("a", _hb(speeds=_speed(0.25e9)), now=3)
    assert [e.kind for e in events] == ["speed_changed"]
    assert events[0].data["ratio"] == pytest.approx(0.25)
    assert c.heartbeat("a", _hb(speeds=_speed(0.26e9)), now=4) == []  # the new level is the baseline
    view = c.node_view(c.nodes["a"], "m")
    assert view.flops_per_s == 0.26e9 and view.memory_bytes == 8 << 30 and view.trusted


def test_link_change_and_views() -> None:
    c = ClusterState()
    for n in ("a", "b"):
        c.register(Registration(node_id=n, url=f"http://{n}", capacity=CAP), now=0)
    link = dict(dst="b", rtt_s=0.001, resolvable_bytes_per_s=500e6, samples=3)
    assert c.heartbeat("a", _hb(links=[LinkSample(bandwidth_bytes_per_s=200e6, **link)]), now=1) == []
    events = c.heartbeat("a", _hb(links=[LinkSample(bandwidth_bytes_per_s=2.5e6, **link)]), now=2)
    assert [(e.kind, e.data["dst"]) for e in events] == [("link_changed", "b")]
    assert [(lv.src, lv.dst, lv.bandwidth_bytes_per_s) for lv in c.link_views()] == [("a", "b", 2.5e6)]
    assert c.peers_of("a") == [("b", "http://b")]
    c.sweep(now=100)  # both lost: their links are no longer offered to planners
    assert c.link_views() == [] and len(c.link_views(alive_only=False)) == 1


def test_after_one_link_drops_the_nodes_other_links_are_provisional_until_re_measured() -> None:
    c = ClusterState()
    for n in ("a", "b", "c", "d"):
        c.register(Registration(node_id=n, url=f"http://{n}", capacity=CAP), now=0)

    def beat(now: float, bandwidths: dict[str, tuple[float, int]]) -> list:
        links = [LinkSample(dst=d, rtt_s=0.001, bandwidth_bytes_per_s=bw, bandwidth_samples=n, samples=n)
                 for d, (bw, n) in bandwidths.items()]  # fmt: skip
        for n in ("b", "c", "d"):  # the others stay alive
            c.heartbeat(n, _hb(), now=now)
        return c.heartbeat("a", _hb(links=links), now=now)

    def views() -> dict[str, tuple[float, bool]]:
        return {lv.dst: (lv.bandwidth_bytes_per_s, lv.provisional) for lv in c.link_views() if lv.src == "a"}

    fast = 100e6
    assert beat(1, {"b": (fast, 5), "c": (fast, 5), "d": (fast, 5)}) == []
    # a's uplink is capped: the hop a->b carries traffic and sees it first; c and d are not re-measured yet.
    events = beat(2, {"b": (0.6e6, 9), "c": (fast, 5), "d": (fast, 5)})
    assert [(e.kind, e.data["dst"]) for e in events] == [("link_changed", "b")]
    assert views() == {"b": (0.6e6, False), "c": (0.6e6, True), "d": (0.6e6, True)}
    # Two new samples on a->d are not a majority of the window yet; three on a->c are.
    beat(3, {"b": (0.6e6, 10), "c": (40e6, 8), "d": (fast, 7)})
    assert views() == {"b": (0.6e6, False), "c": (40e6, False), "d": (0.6e6, True)}
    # The drop ends once every link was re-measured, or at the latest PROVISIONAL_MAX_S after it
    # (a peer no probe reaches).
    later = 3 + PROVISIONAL_MAX_S
    beat(later, {"b": (0.6e6, 11), "c": (40e6, 9), "d": (fast, 7)})
    c.sweep(now=later)
    assert views()["d"] == (fast, False)
    # A rise ends the drop at once: the other links go back to their own figures.
    beat(later + 1, {"b": (fast, 14), "c": (0.5e6, 12), "d": (fast, 7)})
    assert views() == {"b": (0.5e6, True), "c": (0.5e6, False), "d": (0.5e6, True)}
    beat(later + 2, {"b": (fast, 14), "c": (40e6, 15), "d": (fast, 7)})
    assert views() == {"b": (fast, False), "c": (40e6, False), "d": (fast, False)}


def test_a_drop_anywhere_marks_every_other_nodes_links_until_re_measured_with_their_own_figures() -> None:
    c = ClusterState()
    for n in ("a", "b", "c"):
        c.register(Registration(node_id=n, url=f"http://{n}", capacity=CAP), now=0)

    def beat(node: str, now: float, dst: str, bw: float, n: int) -> None:
        link = LinkSample(dst=dst, rtt_s=0.001, bandwidth_bytes_per_s=bw, bandwidth_samples=n, samples=n)
        c.heartbeat(node, _hb(links=[link]), now=now)

    def views() -> dict[str, tuple[float, bool]]:
        return {lv.src: (lv.bandwidth_bytes_per_s, lv.provisional) for lv in c.link_views()}

    beat("a", 0.5, "c", 160e6, 4)
    beat("b", 1, "c", 100e6, 5)
    beat("a", 1, "c", 100e6, 5)  # a change of 0.6x: an event, but estimates swing that much
    assert [lv.provisional for lv in c.link_views()] == [False, False]
    beat("a", 2, "c", 0.6e6, 8)  # a's uplink dropped; b's has not reported any change (yet)
    assert views() == {"a": (0.6e6, False), "b": (100e6, True)}
    beat("b", 3, "c", 100e6, 7)
    assert views()["b"] == (100e6, True)  # two new samples are not a majority of the window
    beat("b", 4, "c", 100e6, 8)
    assert views()["b"] == (100e6, False)  # re-measured: its own figure, confirmed
    beat("a", 5, "c", 0.3e6, 9)  # a new drop: b's link needs new samples again, or PROVISIONAL_MAX_S
    assert views()["b"] == (100e6, True)
    c.heartbeat("b", _hb(), now=5 + PROVISIONAL_MAX_S)
    c.heartbeat("a", _hb(), now=5 + PROVISIONAL_MAX_S)
    c.heartbeat("c", _hb(), now=5 + PROVISIONAL_MAX_S)
    c.sweep(now=5.1 + PROVISIONAL_MAX_S)
    assert views()["b"] == (100e6, False)


def test_an_rtt_that_doubles_marks_the_links_without_lowering_any_figure() -> None:
    c = ClusterState()
    for n in ("a", "b", "c"):
        c.register(Registration(node_id=n, url=f"http://{n}", capacity=CAP), now=0)

    def beat(node: str, now: float, dst: str, rtt: float, n: int) -> None:
        link = LinkSample(dst=dst, rtt_s=rtt, bandwidth_bytes_per_s=60e6, bandwidth_samples=n, samples=n)
        c.heartbeat(node, _hb(links=[link]), now=now)

    def views() -> dict[tuple[str, str], tuple[float, bool]]:
        return {(lv.src, lv.dst): (lv.bandwidth_bytes_per_s, lv.provisional) for lv in c.link_views()}

    beat("a", 1, "b", 0.002, 5)
    beat("a", 1, "c", 0.002, 5)
    beat("b", 1, "c", 0.002, 5)
    beat("a", 2, "b", 0.005, 6)  # 2.5x but only 3 ms more: host noise, not a capped uplink
    assert not any(p for _, p in views().values())
    beat("a", 3, "b", 0.300, 7)  # queueing behind a capped uplink's traffic
    assert views() == {("a", "b"): (60e6, False), ("a", "c"): (60e6, True), ("b", "c"): (60e6, True)}


def test_a_late_nodes_links_are_provisional_until_its_next_heartbeat() -> None:
    c = ClusterState(Thresholds(lost_after_s=2.0, late_after_s=1.5))
    for n in ("a", "b"):
        c.register(Registration(node_id=n, url=f"http://{n}", capacity=CAP), now=0)
    c.heartbeat("a", _hb(links=[LinkSample(dst="b", bandwidth_bytes_per_s=60e6, rtt_s=0.001)]), now=1)
    c.heartbeat("b", _hb(links=[LinkSample(dst="a", bandwidth_bytes_per_s=60e6, rtt_s=0.001)]), now=1)
    c.heartbeat("b", _hb(), now=2.6)  # a's heartbeat is 1.6 s old: its figures may be stale

    def provisional(now: float | None) -> dict[str, bool]:
        return {lv.src: lv.provisional for lv in c.link_views(now=now)}

    assert provisional(now=2.6) == {"a": True, "b": False}
    assert provisional(now=None) == {"a": False, "b": False}  # no clock, no lateness
    c.heartbeat("a", _hb(), now=2.7)
    assert provisional(now=2.7) == {"a": False, "b": False}


def test_paired_probes_cancel_shared_overhead() -> None:
    est = LinkEstimator()
    # 8 ms of overhead on both, 20 ms of transfer for the extra 50 kB: 2.5 MB/s exactly.
    for _ in range(3):
        est.add_pair((64, 0.008), (50_064, 0.028))
    assert est.bandwidth.value() == pytest.approx(2.5e6)
    assert est.rtt.value() == pytest.approx(0.008)


def test_peers_past_the_limit_are_ring_successors_stable_under_churn() -> None:
    c = ClusterState()
    ids = [f"n{i:03d}" for i in range(200)]
    for n in ids:
        c.register(Registration(node_id=n, url=f"http://{n}", capacity=CAP), now=0)
    assert len(c.peers_of("n000")) == 199  # no limit: everyone, as before
    assert sorted(p for p, _ in c.peers_of("n000", limit=199)) == ids[1:]  # a limit above the fleet: all
    peers = {n: [p for p, _ in c.peers_of(n, limit=8)] for n in ids}
    assert all(len(set(v)) == 8 and n not in v for n, v in peers.items())
    # Every node is probed by about as many nodes as it probes (the ring spreads the load).
    probed_by = {n: 0 for n in ids}
    for v in peers.values():
        for p in v:
            probed_by[p] += 1
    assert set(probed_by.values()) == {8}
    # One node lost: only the nodes that had it as a peer get a different set.
    c.nodes["n100"].last_seen = 0
    for n in ids:
        if n != "n100":
            c.nodes[n].last_seen = 10
    c.sweep(now=10.5)
    after = {n: [p for p, _ in c.peers_of(n, limit=8)] for n in ids if n != "n100"}
    changed = [n for n, v in after.items() if v != peers[n]]
    assert sorted(changed) == sorted(n for n, v in peers.items() if "n100" in v)
    assert all("n100" not in v for v in after.values())
