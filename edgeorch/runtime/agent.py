"""The worker's monitoring agent: register, heartbeat, calibrate, probe speed and links.

Every loop catches, logs and backs off, so a monitor or network outage never
takes the worker down; when the monitor comes back (or forgets this node) the
agent registers again and carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field

import httpx
import psutil

from edgeorch.monitoring.estimators import LinkEstimator, RollingMedian, rtt_jumped
from edgeorch.runtime.host import StageHost
from edgeorch.runtime.memory import proc_memory
from edgeorch.runtime.probes import ModelProbe, calibrate, load_probe, probe_interval_s
from edgeorch.schemas.monitor import (
    Heartbeat,
    HeartbeatReply,
    LinkSample,
    NodeCapacity,
    ProfileReport,
    Registration,
    SpeedSample,
)
from edgeorch.schemas.profile import EXACT_FORMAT, split_profile_key
from edgeorch.security.certs import client_verify

log = logging.getLogger(__name__)

SMALL_PROBE_BYTES = 64
# Large enough to be timed on a slow link, small enough that a probe never
# hogs one: 256 KiB is 0.1 s at 20 Mbit/s and unresolvably fast on loopback.
MIN_PROBE_BYTES, MAX_PROBE_BYTES = 32 * 1024, 256 * 1024
PROBE_TRANSFER_TARGET_S = 0.025
# When the RTT to one peer jumps, the node's own uplink has most likely
# changed, and with it every outgoing link. Left to the probe rounds, the
# other links' medians would flip one sample per round (~4 s with a 150 ms
# RTT and three peers), long enough for a planner to route around the bad
# link through another one just as bad: measured on link_degradation_int8,
# the first re-plan moved the slow node's traffic to a peer whose link had
# not been re-measured yet. So a jump, seen by a probe or by a decode step's
# hop, starts a burst: enough back-to-back RTT probes of every peer,
# concurrently, to turn each window's median over.
UPLINK_BURST_COOLDOWN_S = 2.0


@dataclass
class AgentConfig:
    """How often the agent measures and reports."""

    monitor_url: str
    node_id: str
    advertise_url: str
    capacity: NodeCapacity
    heartbeat_interval_s: float = 1.0
    speed_probe_interval_s: float = 0.25
    link_probe_interval_s: float = 0.5
    speed_window: int = 9


# Traffic steps are turned into probe-equivalent speeds by a factor learned per
# stage shape; it depends on the shape only, so a long window costs nothing.
FACTOR_WINDOW = 31
MIN_FACTOR_SAMPLES = 5


@dataclass
class _Speed:
    decode: RollingMedian
    prefill: RollingMedian
    probe: RollingMedian  # decode samples of the periodic probe alone
    factors: dict[tuple[int, int], RollingMedian] = field(default_factory=dict)


class MonitorAgent:
    """Runs beside the worker's HTTP server for as long as the worker lives."""

    def __init__(self, host: StageHost, cfg: AgentConfig):
        self.host = host
        self.cfg = cfg
        self.http = httpx.AsyncClient(timeout=5.0, verify=client_verify())
        self.probes: dict[str, ModelProbe] = {}
        self.calibrations: dict[str, ProfileReport] = {}
        self.stage_times: dict[str, RollingMedian] = {}
        self.speeds: dict[str, _Speed] = {}
        self.links: dict[str, LinkEstimator] = {}
        self.peers: dict[str, str] = {}  # node id -> url
        self.pending_profiles: list[ProfileReport] = []
        self._profiling: set[str] = set()
        self._jumped: set[str] = set()  # peers whose RTT jumped in traffic since the last burst
        self._burst_wanted = asyncio.Event()
        self._beat_now = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.registered = False
        host.observers.append(self._on_forward)

    async def start(self) -> None:
        """Start the loops in the background."""
        psutil.cpu_percent(None)  # the first call only primes the counter
        for loop in (self._heartbeat_loop, self._speed_loop, self._link_loop):
            self._tasks.append(asyncio.create_task(loop()))

    async def stop(self) -> None:
        """Cancel the loops and close the client."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.http.aclose()

    # ----- reporting -------------------------------------------------------

    async def _register(self) -> None:
        reg = Registration(node_id=self.cfg.node_id, url=self.cfg.advertise_url, capacity=self.cfg.capacity)
        resp = await self.http.post(f"{self.cfg.monitor_url}/v1/nodes", json=reg.model_dump())
        resp.raise_for_status()
        self.registered = True
        log.info("registered with the monitor at %s as %s", self.cfg.monitor_url, self.cfg.node_id)

    def heartbeat(self) -> Heartbeat:
        """The heartbeat to send now."""
        reports, self.pending_profiles = self.pending_profiles, []
        return Heartbeat(
            cpu_percent=psutil.cpu_percent(None),
            memory_free_bytes=psutil.virtual_memory().available,
            rss_bytes=proc_memory()["rss"],
            planned_bytes=self.host.planned_bytes(),
            queue_depth=self.host.in_flight,
            sessions=self.host.sessions.count(),
            stage_compute_s={
                st: m.value() for st, m in self.stage_times.items() if st in self.host.stages and m.value()
            },
            speeds={m: self._speed_sample(m) for m in self.calibrations},
            links=[
                LinkSample(
                    dst=dst,
                    rtt_s=e.rtt.value(),
                    bandwidth_bytes_per_s=e.bandwidth.value(),
                    resolvable_bytes_per_s=e.resolvable_bytes_per_s,
                    samples=e.samples,
                    bandwidth_samples=e.bandwidth_samples,
                )
                for dst, e in self.links.items()
                if dst in self.peers
            ],  # fmt: skip
            profiles=reports,
        )

    async def _beat_once(self) -> None:
        if not self.registered:
            await self._register()
        hb = self.heartbeat()
        url = f"{self.cfg.monitor_url}/v1/nodes/{self.cfg.node_id}/heartbeat"
        try:
            resp = await self.http.post(url, json=hb.model_dump())
        except httpx.HTTPError:
            self.pending_profiles = hb.profiles + self.pending_profiles  # report them next time
            raise
        if resp.status_code == 404:  # the monitor forgot us (fresh database): register again
            self.registered = False
            self.pending_profiles = hb.profiles + self.pending_profiles
            return
        resp.raise_for_status()
        reply = HeartbeatReply.model_validate(resp.json())
        self.peers = {p.node_id: p.url for p in reply.peers}
        for model in reply.profile_models:
            if model not in self.probes and model not in self._profiling:
                self._profiling.add(model)
                self._tasks.append(asyncio.create_task(self._profile_in_background(model)))

    async def _heartbeat_loop(self) -> None:
        backoff = self.cfg.heartbeat_interval_s
        while True:
            try:
                await self._beat_once()
                backoff = self.cfg.heartbeat_interval_s
                with contextlib.suppress(TimeoutError):  # a finished uplink burst reports at once
                    await asyncio.wait_for(self._beat_now.wait(), self.cfg.heartbeat_interval_s)
                self._beat_now.clear()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: log, back off, retry
                log.warning(
                    "heartbeat to %s failed (%r); retrying in %.1fs", self.cfg.monitor_url, exc, backoff
                )
                await asyncio.sleep(backoff * (0.8 + 0.4 * random.random()))
                backoff = min(backoff * 2, 10.0)

    # ----- speed -----------------------------------------------------------

    async def profile(self, model: str) -> ProfileReport:
        """Calibrate ``model`` (a profile key: a model, or ``model@format``) on this node now,
        and keep probing its speed afterwards."""
        name, fmt = split_profile_key(model)
        model_dir = self.host.store.path(name)
        probe = self.probes.get(model)
        if probe is None:
            engine_format = None if fmt == EXACT_FORMAT else fmt
            # On the loader thread, not the compute thread: building the probe's modules while a
            # load (or the worker's start-up warm-up) builds others gave them meta parameters.
            probe = await self.host.on_loader(lambda: load_probe(model, model_dir, engine_format))
            self.probes[model] = probe
        report, _ = await self.host.run_compute(lambda: calibrate(probe, self.host.hold), emulate=False)
        # The window restarts from probes taken under the new calibration.
        speed = self._speed(model)
        speed.decode.clear()
        speed.prefill.clear()
        speed.probe.clear()
        self.calibrations[model] = report
        log.info("calibrated %s: %.3g decode flop/s, %.3g prefill flop/s", model,
                 report.decode_flops_per_s, report.prefill_flops_per_s)  # fmt: skip
        return report

    async def _profile_in_background(self, model: str) -> None:
        try:
            report = await self.profile(model)
            # Not `pending.append(await ...)`: the heartbeat swaps the list
            # while we wait, and the report would land in the old one.
            self.pending_profiles.append(report)
        except Exception:  # noqa: BLE001
            log.exception("calibrating %s failed", model)
        finally:
            self._profiling.discard(model)

    def _speed_sample(self, model: str) -> SpeedSample:
        """Median of recent samples; the calibration until samples arrive."""
        s, cal = self._speed(model), self.calibrations[model]
        return SpeedSample(
            decode_flops_per_s=s.decode.value() or cal.decode_flops_per_s,
            prefill_flops_per_s=s.prefill.value() or cal.prefill_flops_per_s,
            samples=len(s.decode),
        )

    def _speed(self, model: str) -> _Speed:
        if model not in self.speeds:
            w = self.cfg.speed_window
            self.speeds[model] = _Speed(RollingMedian(w), RollingMedian(w), RollingMedian(w))
        return self.speeds[model]

    async def _speed_loop(self) -> None:
        while True:
            await asyncio.sleep(probe_interval_s(self.cfg.speed_probe_interval_s, list(self.probes.values())))
            for model, probe in list(self.probes.items()):
                try:
                    flops, seconds = await self.host.run_compute(probe.probe_step)
                    speed = self._speed(model)
                    speed.decode.add(flops / seconds)
                    speed.probe.add(flops / seconds)
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001
                    log.exception("speed probe of %s failed", model)

    def _on_forward(self, sample: dict) -> None:
        """Passive measurements from real traffic: stage speed and the hop to the next node.

        A batch of several sessions' tokens (runtime/batching.py) takes longer
        than one token but says nothing about the node's speed: it is this
        deployment's own load, not a change. Only single steps feed the speed
        (the active probes keep measuring under load); every step feeds the link.
        """
        if sample.get("batch", 1) == 1:
            self._on_single_step(sample)
        self._on_hop(sample)

    def _on_single_step(self, sample: dict) -> None:
        self.stage_times.setdefault(sample["stage"], RollingMedian(self.cfg.speed_window)).add(
            sample["compute_s"]
        )
        probe = self.probes.get(sample["model"])
        cal = self.calibrations.get(sample["model"])
        if probe is not None and cal is not None and sample["compute_s"] > 0:
            # Scale the step to the probe's yardstick: how much slower or faster
            # than at calibration did these units run?
            expected = probe.expected_s(sample["start"], sample["end"], sample["q_len"])
            if expected:
                ratio = expected / sample["compute_s"]
                speed = self._speed(probe.model)
                if sample["q_len"] == 1:
                    self._add_decode_traffic(speed, (sample["start"], sample["end"]),
                                             cal.decode_flops_per_s * ratio)  # fmt: skip
                else:
                    speed.prefill.add(cal.prefill_flops_per_s * ratio)

    def _on_hop(self, sample: dict) -> None:
        if "next_url" in sample:
            dst = next(
                (n for n, u in self.peers.items() if u.rstrip("/") == sample["next_url"].rstrip("/")), None
            )
            if dst is not None and sample["hop_s"] > 0:
                est = self.links.setdefault(dst, LinkEstimator())
                if sample["bytes_out"] <= est.small_bytes and rtt_jumped(est.rtt.value(), sample["hop_s"]):
                    self._jumped.add(dst)  # a decode step saw it first: re-measure the uplink now
                    self._burst_wanted.set()
                est.add(sample["bytes_out"], sample["hop_s"])

    @staticmethod
    def _add_decode_traffic(speed: _Speed, shape: tuple[int, int], raw: float) -> None:
        """Add a traffic step to the decode window, on the probe's yardstick.

        A stage of many layers runs each layer faster than the one-layer probe
        (per-call overheads are shared), so its raw speed reads high — 2x for
        17 layers of SmolLM2 — and a window fed by both would flip between the
        two populations as the traffic rate changes. The factor probe/raw of
        each stage shape is learned from samples taken side by side; both move
        together when the node changes speed, so the factor does not, and the
        scaled traffic follows a real change as fast as the probes do.
        """
        probe_now = speed.probe.value()
        factor = speed.factors.setdefault(shape, RollingMedian(FACTOR_WINDOW))
        if probe_now is not None:
            factor.add(probe_now / raw)
        if len(factor) >= MIN_FACTOR_SAMPLES:
            speed.decode.add(raw * factor.value())

    # ----- links -----------------------------------------------------------

    async def _link_loop(self) -> None:
        last_burst = -UPLINK_BURST_COOLDOWN_S
        next_round = time.monotonic() + self.cfg.link_probe_interval_s
        while True:
            # A jump seen in traffic (a decode step's hop) wakes the loop at once;
            # the regular rounds keep their own schedule either way.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._burst_wanted.wait(), max(0.0, next_round - time.monotonic()))
            self._burst_wanted.clear()
            jumped, self._jumped = self._jumped, set()
            peers = list(self.peers.items())
            may_burst = time.monotonic() - last_burst >= UPLINK_BURST_COOLDOWN_S
            if not jumped and time.monotonic() >= next_round:
                for dst, url in peers:
                    if await self._try_probe(dst, url) and may_burst:
                        jumped.add(dst)  # the burst probes every peer, this round's rest included
                        break
                next_round = time.monotonic() + self.cfg.link_probe_interval_s
            if jumped and may_burst:
                await self.burst_probe(peers, reason=f"RTT to {', '.join(sorted(jumped))} jumped")
                last_burst = time.monotonic()

    async def burst_probe(self, peers: list[tuple[str, str]], reason: str) -> None:
        """RTT probes to every peer, concurrently, until each link's RTT median rests on new samples.

        Small probes only: a round then costs one RTT, not a paced transfer
        per peer through this node's (serialised) uplink, and RTT is what
        jumped. Bandwidth follows at the normal probe rate.
        """
        rounds = LinkEstimator.window // 2 + 1  # a majority of the window
        log.info("%s: re-measuring the RTT of %d links (%d rounds)", reason, len(peers), rounds)
        for _ in range(rounds):
            await asyncio.gather(*(self._try_probe(dst, url, rtt_only=True) for dst, url in peers))
        # Report every re-measured link now, not up to a heartbeat later: the
        # first jumped link may already be at the monitor, and a plan made on
        # it alone routes through the other links' old figures (measured: a
        # re-plan 2.0 s after the change put the slowed node first).
        self._beat_now.set()

    async def _try_probe(self, dst: str, url: str, rtt_only: bool = False) -> bool:
        """One probe of the link to ``dst``; True when its RTT jumped (False also when it failed)."""
        try:
            return await self._probe_link(dst, url, rtt_only)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a dead peer is the monitor's business
            log.debug("link probe to %s failed: %r", dst, exc)
            return False

    async def _probe_link(self, dst: str, url: str, rtt_only: bool = False) -> bool:
        """A small and a large transfer to ``dst`` (the small one alone with ``rtt_only``);
        True when the small one's RTT jumped off the median."""
        est = self.links.setdefault(dst, LinkEstimator())
        sink = f"{url.rstrip('/')}/v1/probe/sink"
        t0 = time.perf_counter()
        (await self.host.paced_post(sink, b"\0" * SMALL_PROBE_BYTES)).raise_for_status()
        t_small = time.perf_counter() - t0
        jumped = rtt_jumped(est.rtt.value(), t_small)
        if rtt_only:
            est.add(SMALL_PROBE_BYTES, t_small)
            return jumped
        bw = est.bandwidth.value()
        size = MIN_PROBE_BYTES if bw is None else int(bw * PROBE_TRANSFER_TARGET_S)
        size = max(MIN_PROBE_BYTES, min(MAX_PROBE_BYTES, size))
        t0 = time.perf_counter()
        (await self.host.paced_post(sink, b"\0" * size)).raise_for_status()
        est.add_pair((SMALL_PROBE_BYTES, t_small), (size, time.perf_counter() - t0))
        return jumped
