"""Measure this node: seconds per unit of a model (calibration), live speed, links to peers.

Calibration loads one unit of each kind (embedding, one layer, head) — every
layer of a family has the same shape, so one stands for all — and times real
prefill and decode steps on them through the worker's compute thread, so the
figures include whatever slows that thread down (other work, the emulated
slowdown). The same layer then serves as a cheap periodic speed probe.

Under a CPU bandwidth limit (a container's ``cpus:``, runtime/cpulimit.py)
every timed block runs back to back for at least :data:`BURST_PERIODS` of
the limit's periods: a shorter burst fits in one period's quota and runs at
full speed, so half a core would measure as a whole one.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgeorch.engine import load_adapter
from edgeorch.engine.kv import LeanKVCache
from edgeorch.engine.stage import unit_loader
from edgeorch.models import adapter_for, load_config
from edgeorch.models.adapter import FamilyAdapter, StageInput
from edgeorch.models.kv import StageKVCache
from edgeorch.runtime.cpulimit import CpuLimit, cpu_limit
from edgeorch.schemas.monitor import ProfileReport, UnitProfileTiming

# hold(t0): wait as the node's emulated slowdown says, return the seconds since t0 (runtime/emulation.py)
Hold = Callable[[float], float]

PREFILL_TOKENS = 64
DECODE_CONTEXT = 64
PROBE_TARGET_S = 0.002  # long enough to rise above timer and scheduler noise
REPEATS = 3  # steps per timed block (at least)
BLOCKS = 3  # timed blocks per unit and phase: their median
# A timed burst under a CPU limit spans this many of its periods: the first
# period may start with a whole quota unused, so a burst of k periods measures
# about (2k - 1) / k times slower on half a core (1.9 for 10), and the kernel
# notices an overrun only at its next tick (4 ms at 250 Hz), which k must dwarf.
BURST_PERIODS = 10
# ...but no burst longer than this: with a 100 ms period (Docker's `cpus:`, Kubernetes'
# CPU limits) 5 periods, still ~1.8x on half a core, and a calibration of ~10 s.
MAX_BURST_S = 0.5
MAX_PROBE_REPEATS = 2000
# Periodic probes as long as a limit's bursts run less often: at most this share of the CPU.
PROBE_DUTY = 0.05


@dataclass
class ModelProbe:
    """Loaded probe units of one model and what a probe step costs in flops."""

    model: str
    adapter: FamilyAdapter
    units: dict[int, torch.nn.Module]
    layer_flops_decode: float
    repeats: int
    base_cache: StageKVCache | None
    # shortest timed burst: BURST_PERIODS of the CPU limit's period, 0 without a limit
    burst_s: float = 0.0
    # (prefill seconds for PREFILL_TOKENS, decode seconds) per probed unit, from calibration
    timings: dict[int, tuple[float, float]] | None = None

    def expected_s(self, start: int, end: int, q_len: int) -> float | None:
        """What a step of units [start, end) over ``q_len`` tokens took at calibration."""
        if self.timings is None:
            return None
        last = self.adapter.num_units - 1
        n_layers = len(range(max(start, 1), min(end, last)))
        phase = 1 if q_len == 1 else 0
        scale = 1.0 if q_len == 1 else q_len / PREFILL_TOKENS
        t = n_layers * self.timings[1][phase]
        t += self.timings[0][phase] if start == 0 else 0.0
        t += self.timings[last][phase] if end == last + 1 else 0.0
        return t * scale

    def probe_step(self) -> float:
        """Run ``repeats`` decode steps of the probe layer; returns the flops done."""
        layer = 1
        with torch.inference_mode():
            for _ in range(self.repeats):
                x = torch.zeros(1, 1, self.adapter.hidden_size)
                cache = _fork(self.base_cache)
                self.adapter.run(
                    [(layer, self.units[layer])], StageInput(x=x, position=DECODE_CONTEXT), cache
                )
        return self.layer_flops_decode * self.repeats


def sustained_burst_s(limit: CpuLimit | None) -> float:
    """How long a timed burst must run for ``limit`` to show in it (0 without a limit)."""
    return 0.0 if limit is None else min(MAX_BURST_S, BURST_PERIODS * limit.period_s)


def probe_interval_s(base_s: float, probes: list[ModelProbe]) -> float:
    """Seconds between periodic probes: ``base_s``, or longer so that long bursts stay under PROBE_DUTY."""
    longest = max((p.burst_s for p in probes), default=0.0)
    return max(base_s, longest / PROBE_DUTY)


def _fork(cache):
    """A cache that starts from ``cache``'s contents without changing them.

    A lean cache is its own fork: a step writes past its length and only
    ``advance`` (which probes never call) would keep what it wrote.
    """
    if cache is None or isinstance(cache, LeanKVCache):
        return cache
    fork = StageKVCache()
    fork._keys, fork._values, fork.seq_len = dict(cache._keys), dict(cache._values), cache.seq_len
    return fork


def load_probe(model: str, model_dir, weight_format: str | None = None) -> ModelProbe:
    """Load the embedding, one layer and the head of a model (blocking: run it off the event loop).

    ``model`` names the probe (a profile key). Without ``weight_format`` the
    units are the reference engine's fp32 modules; with one, the lean
    engine's in that format, since a format's speed is what its stages will
    run at (int8 decodes about three times faster than fp32 here).
    """
    if weight_format is None:
        adapter = adapter_for(load_config(model_dir))
    else:
        adapter = load_adapter(model_dir, "lean", weight_format)
    # Packed unit files when the format has them (a synthesised model has nothing else).
    load, _ = unit_loader(model_dir, adapter)
    last = adapter.num_units - 1
    units = {u: load(u) for u in (0, 1, last)}
    profile = adapter.profile(model, context_tokens=DECODE_CONTEXT)
    base = None
    if adapter.is_decoder:
        base = StageKVCache() if weight_format is None else adapter.new_cache(1, 2)
        with torch.inference_mode():
            x = torch.zeros(1, DECODE_CONTEXT, adapter.hidden_size)
            adapter.run([(1, units[1])], StageInput(x=x), base)
        base.advance(DECODE_CONTEXT)
    burst_s = sustained_burst_s(cpu_limit())
    return ModelProbe(model, adapter, units, profile.units[1].flops_per_token, 1, base, burst_s)


def _time_unit(probe: ModelProbe, u: int, tokens: int, decode: bool, hold: Hold) -> tuple[float, float]:
    """A warm-up step, then steps of unit ``u`` back to back, then the node's hold.

    At least ``REPEATS`` steps, and for at least the probe's sustained burst.
    Returns seconds per step as the clock read after the hold, and seconds
    per step of compute alone. One hold per block, not per step, and a
    warm-up first: a step that follows a sleep runs on cold caches (a 0.3 ms
    step then took twice as long), which would count the emulation's own
    artefact as slowness.
    """
    adapter = probe.adapter
    if u == 0:
        x = torch.zeros(1, tokens, dtype=torch.int64)
    else:
        x = torch.zeros(1, tokens, adapter.hidden_size)
    position = DECODE_CONTEXT if decode and adapter.is_decoder else 0
    t0, steps = 0.0, -1  # the warm-up step is not counted
    with torch.inference_mode():
        while steps < REPEATS or time.perf_counter() - t0 < probe.burst_s:
            cache = _fork(probe.base_cache) if decode and 1 <= u <= adapter.num_layers else None
            adapter.run([(u, probe.units[u])], StageInput(x=x, position=position), cache)
            steps += 1
            t0 = time.perf_counter() if steps == 0 else t0
    computed = time.perf_counter() - t0
    return hold(t0) / steps, computed / steps


def _no_hold(t0: float) -> float:
    return time.perf_counter() - t0


def calibrate(probe: ModelProbe, hold: Hold = _no_hold) -> ProfileReport:
    """Time every unit kind for prefill and decode (blocking; call on the compute thread).

    ``hold(t0)`` is the node's emulated slowdown: it waits as a slower node
    would and returns the seconds since ``t0`` from the clock, so a slowed
    node calibrates slower because it really took longer.
    """
    t_start = time.perf_counter()
    adapter = probe.adapter
    timings, decode_compute_s = {}, 0.0
    for u in sorted(probe.units):
        pre = statistics.median(_time_unit(probe, u, PREFILL_TOKENS, False, hold)[0] for _ in range(BLOCKS))
        decode = [_time_unit(probe, u, 1, True, hold) for _ in range(BLOCKS)]
        timings[u] = (pre, statistics.median(d[0] for d in decode))
        if u == 1:
            decode_compute_s = statistics.median(d[1] for d in decode)
    probe.timings = timings
    # Sized on the compute alone: a slowed node's probe does the same work and waits longer.
    target_s = max(PROBE_TARGET_S, probe.burst_s)
    probe.repeats = max(1, min(MAX_PROBE_REPEATS, math.ceil(target_s / max(decode_compute_s, 1e-6))))
    n_layers, last = adapter.num_layers, adapter.num_units - 1
    decode_s = timings[0][1] + n_layers * timings[1][1] + timings[last][1]
    # Speeds are quoted on one layer, the unit the periodic probe and the
    # traffic samples are scaled to, so every speed figure of a node compares.
    layer_flops = probe.layer_flops_decode
    return ProfileReport(
        model=probe.model, prefill_tokens=PREFILL_TOKENS, decode_context=DECODE_CONTEXT,
        units=[UnitProfileTiming(unit=adapter.unit_name(u), prefill_s=p, decode_s=d) for u, (p, d) in timings.items()],
        decode_flops_per_s=layer_flops / timings[1][1],
        prefill_flops_per_s=layer_flops * PREFILL_TOKENS / timings[1][0],
        seconds_per_token_decode=decode_s, took_s=time.perf_counter() - t_start,
    )  # fmt: skip
