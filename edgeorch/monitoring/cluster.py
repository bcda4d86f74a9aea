"""The monitor's picture of the cluster, and the events its changes raise.

Pure: every method takes ``now`` and returns the events it detected; the
service persists and publishes them. That keeps the detection rules (what is
"lost", what is a "significant" change) testable without clocks or Redis.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field
from typing import Any

from edgeorch.monitoring.estimators import RTT_JUMP_MIN_S, bandwidth_changed, relative_change, rtt_changed
from edgeorch.schemas.monitor import (
    Heartbeat,
    LinkSample,
    LinkView,
    NodeCapacity,
    NodeView,
    ProfileReport,
    Registration,
    SpeedSample,
)


@dataclass(frozen=True)
class Thresholds:
    """When a change is significant enough to publish."""

    lost_after_s: float = 2.0
    speed_rel: float = 0.3
    bandwidth_rel: float = 0.3
    rtt_rel: float = 0.5
    # A node whose last heartbeat is older than this (but not yet lost) reports figures that may be
    # stale: its links are provisional. Heartbeats share the node's uplink and queue behind its
    # activations when that uplink is capped (measured: figures 10 s late, issue 21).
    late_after_s: float = 1.5


@dataclass
class EventDraft:
    """An event before it gets its id and timestamp from the store."""

    kind: str
    node_id: str | None
    data: dict[str, Any] = field(default_factory=dict)


class UnknownNode(LookupError):
    """A heartbeat from a node that has not registered (or that the monitor forgot)."""


@dataclass
class NodeRecord:
    """One node: its registration, liveness, measurements."""

    node_id: str
    url: str
    capacity: NodeCapacity
    registered_at: float
    last_seen: float | None = None
    state: str = "alive"
    live: dict[str, Any] = field(default_factory=dict)
    speeds: dict[str, SpeedSample] = field(default_factory=dict)
    # Speeds at the last published level, per model: the reference for "changed".
    speed_baseline: dict[str, float] = field(default_factory=dict)
    profiles: dict[str, ProfileReport] = field(default_factory=dict)


@dataclass
class LinkRecord:
    """One directed link's latest estimate and its last published level."""

    sample: LinkSample
    updated_at: float
    baseline_bw: float | None = None
    baseline_rtt: float | None = None


# After one of a node's links drops to half or less (or its RTT doubles), every other link is
# provisional until its bandwidth estimate has seen this many new transfers (a majority of the
# estimator's window of 5), or for PROVISIONAL_MAX_S at most (a peer no probe
# reaches, or an older worker that does not count its bandwidth samples).
PROVISIONAL_SAMPLES = 3
PROVISIONAL_MAX_S = 30.0
# Only a drop to half or less starts this (and only a rise to twice or more ends a node's drop).
PROVISIONAL_FACTOR = 2.0


@dataclass
class UplinkDrop:
    """One of a node's links dropped: the node's other links, until each is re-measured.

    A node's links to its peers share its uplink. When the uplink degrades,
    the links that carry traffic are re-measured at once (every hop is a
    sample) and the others only by the next probes, seconds later; meanwhile
    a planner that believes their old figures moves stages onto them
    (measured, issue 21: a re-split predicted 3.15 s whose four fp32 hops
    alone took ~3.7 s at the new cap, and a KV migration predicted 0.12 s
    that took 12.9 s). So until re-measured they are reported at most at the
    dropped link's new bandwidth.

    Other nodes' links are marked too (:attr:`ClusterState.settling`), with
    their own figures: a drop on one node is evidence that the network
    changed (a shared WAN uplink or switch), and every uplink of a site
    capped at once reports node by node over ~10 s. The controller does not
    move stages onto any provisional link, so a plan cannot flee onto the
    links that have merely not reported yet.
    """

    bandwidth: float  # the lowest new estimate among the node's dropped links (inf: only its RTT rose)
    at: float
    marks: dict[str, int]  # dst -> that link's bandwidth_samples when the drop was seen


class ClusterState:
    """Nodes and links as last measured; the rules that turn measurements into events."""

    def __init__(self, thresholds: Thresholds | None = None):
        self.t = thresholds or Thresholds()
        self.nodes: dict[str, NodeRecord] = {}
        self.links: dict[tuple[str, str], LinkRecord] = {}
        self.drops: dict[str, UplinkDrop] = {}  # src node -> its links still to re-measure after a drop
        # Every other node's links since the first drop of an episode: (src, dst) -> bandwidth_samples then.
        self.settling: dict[tuple[str, str], int] = {}
        self.settling_since = 0.0
        self._ring: list[tuple[bytes, str]] | None = None  # live nodes by hash; None: rebuild
        # Bumped whenever the live set (so anyone's peers) may have changed: what a cached reply keys on.
        self.ring_version = 0

    def restore(self, reg: Registration, registered_at: float, now: float) -> None:
        """Re-add a node from durable storage after a restart; it must heartbeat to stay alive."""
        self.nodes[reg.node_id] = NodeRecord(reg.node_id, reg.url, reg.capacity, registered_at, last_seen=now)
        self._ring_changed()

    def register(self, reg: Registration, now: float) -> list[EventDraft]:
        """A node announces itself: joined (new), returned (was lost), or a refresh."""
        rec = self.nodes.get(reg.node_id)
        self._ring_changed()
        if rec is None:
            self.nodes[reg.node_id] = NodeRecord(reg.node_id, reg.url, reg.capacity, now, last_seen=now)
            return [EventDraft("node_joined", reg.node_id, {"url": reg.url, **reg.capacity.model_dump()})]
        was_lost = rec.state == "lost"
        rec.url, rec.capacity, rec.last_seen, rec.state = reg.url, reg.capacity, now, "alive"
        return [EventDraft("node_returned", reg.node_id, {"url": reg.url})] if was_lost else []

    def heartbeat(self, node_id: str, hb: Heartbeat, now: float) -> list[EventDraft]:
        """Apply a heartbeat; returns speed, link, profile and liveness events."""
        rec = self.nodes.get(node_id)
        if rec is None:
            raise UnknownNode(f"node {node_id!r} is not registered")
        events: list[EventDraft] = []
        if rec.state == "lost":
            rec.state = "alive"
            self._ring_changed()
            events.append(EventDraft("node_returned", node_id, {"url": rec.url}))
        rec.last_seen = now
        rec.live = hb.model_dump(
            include={
                "cpu_percent",
                "memory_free_bytes",
                "rss_bytes",
                "planned_bytes",
                "queue_depth",
                "sessions",
                "stage_compute_s",
            }  # fmt: skip
        )
        for report in hb.profiles:
            rec.profiles[report.model] = report
            events.append(EventDraft("profiled", node_id, {
                "model": report.model, "decode_flops_per_s": report.decode_flops_per_s,
                "prefill_flops_per_s": report.prefill_flops_per_s, "took_s": report.took_s,
            }))  # fmt: skip
        for model, speed in hb.speeds.items():
            rec.speeds[model] = speed
            events.extend(self._speed_event(rec, model, speed))
        for link in hb.links:
            events.extend(self._link_event(node_id, link, now))
        return events

    def _speed_event(self, rec: NodeRecord, model: str, speed: SpeedSample) -> list[EventDraft]:
        new = speed.decode_flops_per_s
        if new is None:
            return []
        old = rec.speed_baseline.get(model)
        if old is None:
            rec.speed_baseline[model] = new
            return []
        if relative_change(old, new) <= self.t.speed_rel:
            return []
        rec.speed_baseline[model] = new
        return [EventDraft("speed_changed", rec.node_id, {
            "model": model, "old_flops_per_s": old, "new_flops_per_s": new, "ratio": new / old,
        })]  # fmt: skip

    def _link_event(self, src: str, s: LinkSample, now: float) -> list[EventDraft]:
        key = (src, s.dst)
        rec = self.links.get(key)
        if rec is None:
            self.links[key] = LinkRecord(s, now, s.bandwidth_bytes_per_s, s.rtt_s)
            return []
        rec.sample, rec.updated_at = s, now
        drop = self.drops.get(src)
        if (
            drop is not None
            and s.dst in drop.marks
            and s.bandwidth_samples >= drop.marks[s.dst] + PROVISIONAL_SAMPLES
        ):
            del drop.marks[s.dst]  # re-measured since the drop: its own figure stands
        mark = self.settling.get(key)
        if mark is not None and s.bandwidth_samples >= mark + PROVISIONAL_SAMPLES:
            del self.settling[key]
        changes: dict[str, Any] = {}
        bw, rtt = s.bandwidth_bytes_per_s, s.rtt_s
        if bw is not None and rec.baseline_bw is None:
            rec.baseline_bw = bw
        elif bw is not None and bandwidth_changed(
            rec.baseline_bw, bw, self.t.bandwidth_rel, s.resolvable_bytes_per_s
        ):
            changes.update(old_bandwidth_bytes_per_s=rec.baseline_bw, new_bandwidth_bytes_per_s=bw)
            self._uplink_changed(src, s.dst, rec.baseline_bw, bw, now)
            rec.baseline_bw = bw
        if rtt is not None and rec.baseline_rtt is None:
            rec.baseline_rtt = rtt
        elif rtt is not None and rtt_changed(rec.baseline_rtt, rtt, self.t.rtt_rel):
            changes.update(old_rtt_s=rec.baseline_rtt, new_rtt_s=rtt)
            self._rtt_changed(src, s.dst, rec.baseline_rtt, rtt, now)
            rec.baseline_rtt = rtt
        if not changes:
            return []
        return [EventDraft("link_changed", src, {"src": src, "dst": s.dst, **changes})]

    def _uplink_changed(self, src: str, dst: str, old: float, new: float, now: float) -> None:
        """A link of ``src`` changed bandwidth. A drop to half or less makes its other links, and every
        other node's, provisional (:meth:`_mark`); a rise to twice or more ends ``src``'s drop (its other
        links keep their own, lower, figures until re-measured). Smaller moves are the estimates' noise
        (at 5 Mbit/s they swing by a third between heartbeats) and change nothing here."""
        if new >= PROVISIONAL_FACTOR * old:
            self.drops.pop(src, None)
        elif new * PROVISIONAL_FACTOR <= old:
            self._mark(src, dst, new, now)

    def _rtt_changed(self, src: str, dst: str, old: float, new: float, now: float) -> None:
        """A link of ``src`` changed RTT. A rise to twice or more (and by 10 ms) is how a capped uplink
        shows first (probes and decode steps queue behind its traffic; bandwidth follows seconds later):
        the links are marked as after a drop, but no figure is lowered (the new bandwidth is unknown)."""
        if new >= PROVISIONAL_FACTOR * old and new - old >= RTT_JUMP_MIN_S:
            self._mark(src, dst, None, now)

    def _mark(self, src: str, dst: str, bandwidth: float | None, now: float) -> None:
        """Every link but ``src``->``dst`` waits to be re-measured (:class:`UplinkDrop`); ``src``'s other
        links are reported at most at ``bandwidth``."""
        drop = self.drops.get(src)
        if drop is None:
            drop = self.drops[src] = UplinkDrop(float("inf"), now, {})
        if bandwidth is not None:
            drop.bandwidth = min(drop.bandwidth, bandwidth)
        if not self.settling:
            self.settling_since = now
        # A link already waiting keeps its mark (and its deadline): it needs re-measuring since the
        # first drop, not since every later one.
        for (a, d), rec in self.links.items():
            if a == src:
                if d != dst:
                    drop.marks.setdefault(d, rec.sample.bandwidth_samples)
            else:
                self.settling.setdefault((a, d), rec.sample.bandwidth_samples)
        drop.marks.pop(dst, None)  # the link that changed was just measured

    def sweep(self, now: float) -> list[EventDraft]:
        """Mark nodes silent for longer than ``lost_after_s`` as lost; end provisional links past their time."""
        for src in [src for src, d in self.drops.items() if not d.marks or now - d.at > PROVISIONAL_MAX_S]:
            del self.drops[src]
        if self.settling and now - self.settling_since > PROVISIONAL_MAX_S:
            self.settling.clear()
        events = []
        for rec in self.nodes.values():
            if (
                rec.state == "alive"
                and rec.last_seen is not None
                and now - rec.last_seen > self.t.lost_after_s
            ):
                rec.state = "lost"
                self._ring_changed()
                events.append(EventDraft("node_lost", rec.node_id, {"silent_s": now - rec.last_seen}))
        return events

    def peers_of(self, node_id: str, limit: int | None = None) -> list[tuple[str, str]]:
        """(id, url) of the other live nodes a node should probe: all of them, or ``limit`` at most.

        Every worker probes every peer it is given, so unbounded this is N²
        probes and N² link records (at 1,000 nodes a million, and every
        heartbeat reply lists 999 peers). Past ``limit`` a node gets its
        ``limit`` successors on a hash ring of the live nodes instead: each
        node still has measured links, the set only changes for the nodes
        next to one that joins or leaves (so link estimates are kept), and
        the monitor's work per heartbeat no longer grows with the fleet.
        """
        if limit is None:
            return [
                (r.node_id, r.url) for r in self.nodes.values() if r.node_id != node_id and r.state == "alive"
            ]
        ring = self._live_ring()
        if len(ring) - 1 <= limit:
            return [(n, self.nodes[n].url) for _, n in ring if n != node_id]
        at = bisect.bisect_right(ring, (_ring_key(node_id), node_id))
        out: list[tuple[str, str]] = []
        for i in range(len(ring)):
            peer = ring[(at + i) % len(ring)][1]
            if peer != node_id:
                out.append((peer, self.nodes[peer].url))
            if len(out) == limit:
                break
        return out

    def _ring_changed(self) -> None:
        self._ring = None
        self.ring_version += 1

    def _live_ring(self) -> list[tuple[bytes, str]]:
        if self._ring is None:
            self._ring = sorted((_ring_key(r.node_id), r.node_id) for r in self.nodes.values()
                                if r.state == "alive")  # fmt: skip
        return self._ring

    def node_view(self, rec: NodeRecord, model: str | None = None) -> NodeView:
        """A node in the shape GET /v1/nodes returns."""
        speed = None
        chosen = model or next(iter(rec.speeds or rec.profiles), None)
        if chosen in rec.speeds and rec.speeds[chosen].decode_flops_per_s:
            speed = rec.speeds[chosen].decode_flops_per_s
        elif chosen in rec.profiles:
            speed = rec.profiles[chosen].decode_flops_per_s
        return NodeView(
            node_id=rec.node_id, url=rec.url, state=rec.state, capacity=rec.capacity,
            memory_bytes=rec.capacity.memory_bytes, trusted=rec.capacity.trusted, watts=rec.capacity.watts,
            flops_per_s=speed, speeds=rec.speeds, profiles=rec.profiles, live=rec.live,
            registered_at=rec.registered_at, last_seen=rec.last_seen,
        )  # fmt: skip

    def link_views(self, alive_only: bool = True, now: float | None = None) -> list[LinkView]:
        """Every directed link estimate (between live nodes, by default); with ``now``, a late node's
        links are provisional."""
        return [LinkView.model_construct(**d) for d in self.link_dicts(alive_only, now)]

    def link_dicts(self, alive_only: bool = True, now: float | None = None) -> list[dict]:
        """:meth:`link_views` as plain dicts (LinkView's fields), for a route that serialises them
        itself: at 1,000 nodes there are 16,000 of them, and building and re-validating that many
        models was a sixth of the monitor's CPU."""
        alive = {n for n, r in self.nodes.items() if r.state == "alive"} if alive_only else None
        late = set() if now is None else {
            n for n, r in self.nodes.items() if r.last_seen is not None and now - r.last_seen > self.t.late_after_s
        }  # fmt: skip
        out = []
        for (src, dst), rec in sorted(self.links.items()):
            if alive is not None and (src not in alive or dst not in alive):
                continue
            s = rec.sample
            bw, provisional = s.bandwidth_bytes_per_s, False
            drop = self.drops.get(src)
            if drop is not None and dst in drop.marks:
                provisional = True
                if drop.bandwidth < float("inf"):
                    bw = min(bw, drop.bandwidth) if bw is not None else drop.bandwidth
            provisional = provisional or src in late or (src, dst) in self.settling
            out.append({
                "src": src, "dst": dst, "bandwidth_bytes_per_s": bw, "rtt_s": s.rtt_s,
                "resolvable_bytes_per_s": s.resolvable_bytes_per_s, "samples": s.samples,
                "updated_at": rec.updated_at, "provisional": provisional,
            })  # fmt: skip
        return out


def _ring_key(node_id: str) -> bytes:
    """A node's place on the peer ring: a hash, so neighbours are unrelated to names or join order."""
    return hashlib.blake2b(node_id.encode(), digest_size=8).digest()
