"""What bench/scale.py samples: CPU and memory of each control-plane process, Redis traffic, heartbeats."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field

import psutil
import redis.asyncio as aioredis

from edgeorch.sim.node import BeatRecord


def _tree(pid: int, children: bool = True) -> list[psutil.Process]:
    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)] if children else [proc]
    except psutil.NoSuchProcess:  # a child that exited between two looks
        return []


@dataclass
class ProcWindow:
    """CPU share (of one core) and peak resident memory of named processes over a window."""

    pids: dict[str, int]
    # Names counted without their child processes: the simulator is this process, and the
    # control plane it started are its children (counted once, under their own names).
    flat: frozenset[str] = frozenset()
    cpu0: dict[str, float] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)
    t0: float = 0.0

    def _cpu(self, name: str, pid: int) -> float:
        total = 0.0
        for p in _tree(pid, name not in self.flat):
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def _rss(self, name: str, pid: int) -> int:
        total = 0
        for p in _tree(pid, name not in self.flat):
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def start(self) -> None:
        """Open the window now."""
        self.t0 = time.monotonic()
        self.cpu0 = {n: self._cpu(n, p) for n, p in self.pids.items()}
        self.sample()

    def sample(self) -> None:
        """Record each process's resident memory now (the window keeps the peak)."""
        for n, p in self.pids.items():
            self.peak_rss[n] = max(self.peak_rss.get(n, 0), self._rss(n, p))

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds each process used since start()."""
        return {n: self._cpu(n, p) - self.cpu0[n] for n, p in self.pids.items()}

    def cpu_percent(self) -> dict[str, float]:
        """Percent of one core each process used since start()."""
        wall = max(1e-9, time.monotonic() - self.t0)
        return {n: 100.0 * (self._cpu(n, p) - self.cpu0[n]) / wall for n, p in self.pids.items()}


async def sample_until(window: ProcWindow, stop: asyncio.Event, every_s: float = 1.0) -> None:
    """Sample memory every ``every_s`` until ``stop`` is set."""
    while not stop.is_set():
        window.sample()
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass


class RedisCounters:
    """PUBLISH calls and all commands, read from Redis's own counters."""

    def __init__(self, url: str):
        self.client = aioredis.from_url(url, socket_timeout=10.0, socket_connect_timeout=5.0)
        self.t0 = 0.0
        self.base = (0, 0)

    async def _read(self) -> tuple[int, int]:
        stats = await self.client.info("commandstats")
        publish = int(stats.get("cmdstat_publish", {}).get("calls", 0))
        total = int((await self.client.info("stats"))["total_commands_processed"])
        return publish, total

    async def start(self) -> None:
        """Open the window now."""
        self.t0, self.base = time.monotonic(), await self._read()

    async def rates(self) -> tuple[float, float]:
        """(published messages/s, Redis commands/s) since start()."""
        publish, total = await self._read()
        wall = max(1e-9, time.monotonic() - self.t0)
        return (publish - self.base[0]) / wall, (total - self.base[1]) / wall

    async def close(self) -> None:
        """Close the client."""
        await self.client.aclose()


def beat_figures(beats: list[BeatRecord], since: float, until: float, nodes: float, period_s: float) -> dict:
    """Heartbeats sent in [since, until): rate against the nodes' due rate, latency percentiles, failures."""
    window = [b for b in beats if since <= b.sent_at < until]
    lat = sorted(b.latency_s for b in window if b.ok)
    due = nodes * (until - since) / period_s

    def pct(q: float) -> float | None:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

    return {
        "beats": len(window),
        "due": due,
        "delivered_ratio": (len(lat) / due) if due else None,
        "failed": sum(not b.ok for b in window),
        "latency_median_s": statistics.median(lat) if lat else None,
        "latency_p99_s": pct(0.99),
        "latency_max_s": lat[-1] if lat else None,
    }
