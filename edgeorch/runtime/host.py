"""A worker's stages: load them, run a step, pass the result down the chain.

The worker service is a thin HTTP shell around :class:`StageHost`. Compute
runs on one dedicated thread (torch uses its own intra-op threads; two
concurrent forwards on two cores would only fight), so the event loop keeps
accepting and forwarding other sessions' frames while a step computes —
which is what lets several sessions pipeline through the chain.

One exception: a small step (a decode token) that arrives while this worker
has nothing else in flight runs on the event loop itself. There is then no
other frame to accept or forward, and it saves the two thread wake-ups a
hand-off to the compute thread costs on every stage of every token, dearest
on a VM whose idle vCPUs halt (measured in bench/overhead.py; docs/design.md,
"As built: the hop transport").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from edgeorch.engine import load_adapter
from edgeorch.engine.stage import LoadedStage
from edgeorch.models.adapter import StageInput
from edgeorch.models.store import ModelStore
from edgeorch.runtime.batching import DEFAULT_MAX_BATCH, BatchedStep, DecodeBatcher, batchable
from edgeorch.runtime.checks import check_input
from edgeorch.runtime.emulation import SlowdownHold, perturbed
from edgeorch.runtime.hosted import HostedStage, StageConflict, StageNotFound, planned_cache
from edgeorch.runtime.logprobs import LOGPROBS_FORMAT, logprob_tensors
from edgeorch.runtime.memory import check_budget, return_memory
from edgeorch.runtime.metrics import WorkerMetrics
from edgeorch.runtime.rows import forward_rows
from edgeorch.runtime.sampling import sample_token
from edgeorch.runtime.sessions import PositionMismatch, SessionError, SessionStore
from edgeorch.runtime.units import UnitCache
from edgeorch.schemas.profile import profile_key
from edgeorch.schemas.stage import Emulation, ForwardMeta, StageInfo, StageSpec
from edgeorch.transport import compression, protocol, wire
from edgeorch.transport.hopclient import HopClient, HopError, HopResponse

log = logging.getLogger(__name__)


class StageHost:
    """Every stage one worker serves, with their sessions and emulated capacity."""

    def __init__(
        self,
        store: ModelStore,
        sessions: SessionStore,
        metrics: WorkerMetrics,
        node_id: str,
        forward_timeout_s: float = 120.0,
        emulation: Emulation | None = None,
        inline_max_tokens: int = 8,
        memory_limit: int | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        row_block: int = 1,
    ):
        self.store = store
        self.sessions = sessions
        self.metrics = metrics
        self.node_id = node_id
        self.forward_timeout_s = forward_timeout_s
        self.emulation = emulation or Emulation()
        # Holds the compute thread after each step as a slower node would (read from the clock).
        self.hold = SlowdownHold(lambda: self.emulation.slowdown)
        self._tamper_rng = torch.Generator().manual_seed(18)  # the emulated tampering's noise
        self.stages: dict[str, HostedStage] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        # Loads read checkpoints on their own thread, so a rollout's PREPARE
        # does not stall the sessions this worker is serving.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader")
        self.units = UnitCache()
        self._load_lock = asyncio.Lock()
        # One transmitter per worker: concurrent sends share the emulated link.
        self._link_lock = asyncio.Lock()
        self.client: HopClient | None = None
        # Called after every forward with what it measured (the monitor agent
        # turns these into passive speed and link samples).
        self.observers: list[Callable[[dict], None]] = []
        self.in_flight = 0
        # Steps of at most this many tokens (batch × length) may compute on the
        # event loop when nothing else is in flight; 0 always uses the thread.
        self.inline_max_tokens = inline_max_tokens
        self._jobs = 0  # compute-thread jobs submitted and not yet awaited back
        self.inline_steps = 0  # forwards computed on the event loop (each hop also says "inline")
        self.memory_limit = memory_limit  # planned weights + KV may not pass it (None: no cap)
        # Decode steps that arrive while the compute thread is busy run together (runtime/batching.py).
        self.batcher = DecodeBatcher(self._on_thread, self.compute_rows_now, max_batch)
        self.row_block = row_block  # decode steps padded to a multiple of it rows (engine/stage.py)

    async def start(self) -> None:
        """Open the keep-alive client used to reach the next stages."""
        self.client = HopClient(timeout_s=self.forward_timeout_s, connect_timeout_s=5.0, max_idle_per_peer=32)

    def warm_engine(self) -> float:
        """Run engine/warmup.py's tiny model once on the loader and compute threads (blocking; at startup)."""
        from edgeorch.engine.warmup import warm_engine

        seconds = warm_engine(
            lambda fn: self._loader.submit(fn).result(), lambda fn: self._executor.submit(fn).result()
        )
        return_memory()
        return seconds

    async def close(self) -> None:
        """Close the client and stop the compute thread."""
        if self.client is not None:
            await self.client.aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)

    # ----- stage lifecycle -------------------------------------------------

    async def load(self, stage_id: str, spec: StageSpec) -> tuple[StageInfo, bool]:
        """Load a stage (idempotent for an identical spec); returns (info, newly loaded)."""
        async with self._load_lock:
            existing = self.stages.get(stage_id)
            if existing is not None:
                if existing.spec == spec:
                    return self.info(stage_id), False
                raise StageConflict(
                    f"stage {stage_id!r} is already loaded with another spec; delete it first"
                )
            model_dir = self.store.path(spec.model)

            def checked_acquire():
                # Off the event loop: a first adapter imports seconds of model code, and
                # /healthz must keep answering meanwhile (a rollout's probes time out at ~1 s).
                adapter = load_adapter(model_dir, spec.engine, spec.format)
                self._check_memory(stage_id, spec, model_dir, adapter)
                return self.units.acquire_stage(model_dir, spec.start, spec.end, adapter=adapter)

            got = await asyncio.get_running_loop().run_in_executor(self._loader, checked_acquire)
            loaded = got.stage
            kv = sum(loaded.adapter.kv_bytes_per_token(u, 4) for u in range(spec.start, spec.end))
            self.stages[stage_id] = HostedStage(stage_id, spec, loaded, kv, got.units_shared)
            log.info(
                "loaded stage %s: %s units [%d, %d) in %.2fs (%d bytes read, %d units shared)",
                stage_id, spec.model, spec.start, spec.end, loaded.load_s, loaded.bytes_read, got.units_shared,
            )  # fmt: skip
            return self.info(stage_id), True

    async def on_loader(self, fn):
        """Run ``fn`` on the loader thread, between loads, and return its result.

        Whatever builds modules belongs there (the warm standby, a calibration's probe): while a
        load builds, accelerate's ``init_empty_weights`` patches torch for every thread, and a
        module built meanwhile on another thread gets meta parameters.
        """
        async with self._load_lock:
            return await asyncio.get_running_loop().run_in_executor(self._loader, fn)

    def planned_bytes(self) -> int:
        """Weights held (shared units once) plus the KV every loaded stage plans for."""
        return self.units.held_bytes() + sum(self.planned_kv(h) for h in self.stages.values())

    @staticmethod
    def planned_kv(hosted: HostedStage) -> int:
        """The KV bytes a stage's spec plans for (sessions x context tokens)."""
        return int(hosted.kv_bytes_per_token * hosted.spec.kv_sessions * hosted.spec.kv_context)

    def _check_memory(self, stage_id: str, spec: StageSpec, model_dir, adapter) -> None:
        """OverMemory when the stage's new weights and planned KV would pass the cap."""
        if self.memory_limit is None:
            return
        profile = adapter.profile(spec.model)
        fresh = [u for u in range(spec.start, spec.end) if not self.units.holds(model_dir, u, adapter)]
        weights = sum(profile.units[u].param_bytes for u in fresh)
        kv = sum(profile.units[u].kv_bytes_per_token for u in range(spec.start, spec.end))
        kv = int(kv * spec.kv_sessions * spec.kv_context)
        check_budget(self.memory_limit, self.planned_bytes(), weights, kv, f"stage {stage_id!r}")

    def unload(self, stage_id: str) -> None:
        """Forget a stage and its sessions."""
        hosted = self.stages.pop(stage_id, None)
        if hosted is None:
            raise StageNotFound(f"stage {stage_id!r} is not loaded on node {self.node_id}")
        self.sessions.drop_stage(stage_id)
        # A step still computing on this stage keeps its modules alive through `hosted`.
        freed = self.units.release_stage(hosted.loaded)
        if freed:
            del hosted
            return_memory()  # mapped unit files are unmapped now; trim what malloc still keeps
        log.info(
            "unloaded stage %s (%d units freed, %d still held)", stage_id, freed, self.units.held_units()
        )

    async def warm(self, stage_id: str) -> float:
        """Run one dummy token through a stage's own units (no next hop, no cache); returns seconds."""
        ld = self._get(stage_id).loaded
        if ld.first:
            x = torch.zeros((1, 1), dtype=torch.int64)
        else:
            x = torch.zeros((1, 1, ld.adapter.hidden_size), dtype=torch.float32)
        _, seconds = await self.run_compute(lambda: ld.run(StageInput(x=x)), emulate=False)
        return seconds

    def info(self, stage_id: str) -> StageInfo:
        """What a loaded stage holds."""
        hosted = self._get(stage_id)
        ld = hosted.loaded
        return StageInfo(
            stage_id=stage_id, model=hosted.spec.model, start=ld.start, end=ld.end, next=hosted.spec.next,
            num_units=ld.adapter.num_units, param_bytes=ld.param_bytes(), bytes_read=ld.bytes_read,
            load_s=ld.load_s, sessions=self.sessions.count(stage_id), units_shared=hosted.units_shared,
            engine=ld.engine, format=ld.weight_format, kv_bytes=self.planned_kv(hosted),
            activation_format=hosted.spec.activation_format,
        )  # fmt: skip

    def _get(self, stage_id: str) -> HostedStage:
        hosted = self.stages.get(stage_id)
        if hosted is None:
            raise StageNotFound(f"stage {stage_id!r} is not loaded on node {self.node_id}")
        return hosted

    # ----- data plane ------------------------------------------------------

    async def forward(self, stage_id: str, body: bytes, max_frame_bytes: int) -> tuple[bytes, list[dict]]:
        """Run one step on a stage and return the chain's answer plus per-hop timings."""
        self.in_flight += 1
        try:
            return await self._forward(stage_id, body, max_frame_bytes)
        finally:
            self.in_flight -= 1

    async def _forward(self, stage_id: str, body: bytes, max_frame_bytes: int) -> tuple[bytes, list[dict]]:
        t_start = time.perf_counter()
        hosted = self._get(stage_id)
        frame = wire.decode_frame(body, max_frame_bytes)
        compression.restore(frame.tensors)  # a lossy hop's activations, float32 again
        self.metrics.bytes_in.labels(stage_id).inc(len(body))
        if protocol.is_rows(frame.meta):  # several sessions' tokens in one frame (runtime/rows.py)
            return await forward_rows(self, hosted, frame, t_start)
        meta = ForwardMeta.model_validate(frame.meta)
        inp = check_input(hosted.loaded, meta, frame)
        t_queued = time.perf_counter()
        can_batch = batchable(hosted, meta, inp)
        if can_batch and self.in_flight == 1:
            # Frames that arrived with this one (a batch the previous stage just
            # relayed) reach this point a loop turn later; yield one turn so
            # they batch with it rather than wait while it computes alone inline.
            await asyncio.sleep(0)
        inline, batch = self._may_inline(inp), 1
        if inline:
            self.inline_steps += 1
            out, compute_s, queue_s = self._compute(hosted, meta, inp, t_queued)
        elif can_batch:
            step: BatchedStep = await self.batcher.submit(hosted, meta, inp, t_queued)
            out, compute_s, queue_s, batch = step.frame, step.compute_s, step.queue_s, step.batch
        else:
            out, compute_s, queue_s = await self._on_thread(self._compute, hosted, meta, inp, t_queued)
        hop = {"stage": stage_id, "node": self.node_id, "compute_s": compute_s, "queue_s": queue_s,
               "inline": inline, "batch": batch}  # fmt: skip
        self.metrics.observe_compute(stage_id, compute_s, len(hosted.loaded.units))
        url = hosted.forward_url()
        model = profile_key(hosted.spec.model, hosted.spec.format)  # the speed it is measured under
        sample = {"stage": stage_id, "model": model, "start": hosted.loaded.start, "end": hosted.loaded.end,
                  "q_len": int(inp.x.shape[1]), "compute_s": compute_s, "batch": batch}  # fmt: skip
        if url is None:
            answer = wire.encode_frame(out)
            hop["handler_s"] = time.perf_counter() - t_start
            self.notify(sample)
            return answer, [hop]
        if hosted.spec.activation_format != "fp32" and "x" in out.tensors:
            out.tensors.update(compression.pack(out.tensors["x"], hosted.spec.activation_format))
        payload = wire.encode_frame(out)
        hop["bytes_out"] = len(payload)
        self.metrics.bytes_out.labels(stage_id).inc(len(payload))
        t0 = time.perf_counter()
        answer, downstream_hops = await self.send(hosted, url, payload)
        hop["downstream_s"] = time.perf_counter() - t0
        hop["handler_s"] = time.perf_counter() - t_start
        if downstream_hops and "handler_s" in downstream_hops[0]:
            sample.update(next_url=str(hosted.spec.next.url), bytes_out=len(payload),
                          hop_s=hop["downstream_s"] - downstream_hops[0]["handler_s"])  # fmt: skip
        self.notify(sample)
        return answer, [hop, *downstream_hops]

    def _may_inline(self, inp: StageInput) -> bool:
        """Whether this step may compute on the event loop instead of the compute thread.

        Only when that blocks nothing: no other forward is in flight here (so
        no frame waits to be accepted or relayed), the compute thread is idle
        (so the caches have one user), the step is small, and the node is not
        emulating a slowdown (whose sleep must not hold the loop).
        """
        return (
            0 < inp.x.shape[0] * inp.x.shape[1] <= self.inline_max_tokens
            and self.in_flight == 1
            and self._jobs == 0
            and self.emulation.slowdown <= 1.0
        )

    def may_inline_rows(self, rows: int) -> bool:
        """Whether a multi-session frame's ``rows`` decode tokens may compute on the event loop (as above)."""
        return (
            rows <= self.inline_max_tokens
            and self.in_flight == 1
            and self._jobs == 0
            and self.emulation.slowdown <= 1.0
            and not self.batcher.queued()
        )

    async def _on_thread(self, fn: Callable, *args):
        self._jobs += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._jobs -= 1

    def notify(self, sample: dict) -> None:
        for observer in self.observers:
            try:
                observer(sample)
            except Exception:  # an observer must never break the data path
                log.exception("forward observer failed")

    async def run_compute(self, fn: Callable[[], object], emulate: bool = True) -> tuple[object, float]:
        """Run ``fn`` on the compute thread (under the emulated slowdown); returns (result, seconds)."""

        def timed():
            t0 = time.perf_counter()
            result = fn()
            return result, self.hold(t0) if emulate else time.perf_counter() - t0

        return await self._on_thread(timed)

    async def paced_post(self, url: str, payload: bytes, **kwargs) -> HopResponse:
        """POST through this node's emulated outgoing link (bandwidth, then RTT)."""
        emu = self.emulation
        if emu.bandwidth_mbps:
            async with self._link_lock:
                await asyncio.sleep(len(payload) * 8 / (emu.bandwidth_mbps * 1e6))
        if emu.rtt_ms:
            await asyncio.sleep(emu.rtt_ms / 2000.0)
        if self.client is None:
            raise RuntimeError("StageHost.start() was not awaited")
        resp = await self.client.post(url, content=payload, **kwargs)
        if emu.rtt_ms:
            await asyncio.sleep(emu.rtt_ms / 2000.0)
        return resp

    def _compute(self, hosted: HostedStage, meta: ForwardMeta, inp: StageInput, t_queued: float):
        """Runs on the compute thread: the units, the cache bookkeeping, the emulated slowdown."""
        t0 = time.perf_counter()
        loaded = hosted.loaded
        cache = self._session_cache(hosted, meta, inp)
        h = loaded.run(inp, cache, self.row_block if batchable(hosted, meta, inp) else 1)
        self._advance(hosted, meta, cache, inp.x.shape[1])
        compute_s = self.hold(t0)
        return self._output(loaded, meta, inp, h), compute_s, t0 - t_queued

    def compute_rows_now(
        self, hosted: HostedStage, steps: list[tuple[ForwardMeta, StageInput]]
    ) -> tuple[list, float]:
        """One decode token of each session as one batch (runtime/batching.py, runtime/rows.py).

        Runs on the compute thread, or inline when :meth:`may_inline_rows` allows.

        Returns each step's output frame or its own error, and the batch's seconds.
        """
        t0 = time.perf_counter()
        results: list = [None] * len(steps)
        ready: list[tuple[int, object]] = []
        seen: set[str] = set()
        for i, (meta, inp) in enumerate(steps):
            try:
                if meta.session in seen:  # a client's duplicate: running both would write one slot twice
                    raise PositionMismatch(f"session {meta.session!r} has two steps in one batch")
                seen.add(meta.session)
                ready.append((i, self._session_cache(hosted, meta, inp)))
            except SessionError as exc:
                results[i] = exc
        if ready:
            inputs, caches = [steps[i][1] for i, _ in ready], [c for _, c in ready]
            outs = hosted.loaded.run_rows(inputs, caches, self.row_block)
            for (i, cache), h in zip(ready, outs, strict=True):
                meta, inp = steps[i]
                self._advance(hosted, meta, cache, 1)
                results[i] = self._output(hosted.loaded, meta, inp, h)
        return results, self.hold(t0)

    def _session_cache(self, hosted: HostedStage, meta: ForwardMeta, inp: StageInput):
        """The session's cache for this step (None on a stage without one), checked by the session store."""
        if not (hosted.loaded.adapter.is_decoder and hosted.loaded.has_layers):
            return None
        new_bytes = int(hosted.kv_bytes_per_token * inp.x.shape[1] * inp.x.shape[0])
        return self.sessions.acquire(
            hosted.stage_id, meta.session, meta.position, new_bytes, lambda: planned_cache(hosted)
        )

    def _advance(self, hosted: HostedStage, meta: ForwardMeta, cache, q_len: int) -> None:
        if cache is not None:
            cache.advance(q_len)
            if meta.release:
                self.sessions.release(hosted.stage_id, meta.session)

    def _output(self, loaded: LoadedStage, meta: ForwardMeta, inp: StageInput, h: torch.Tensor) -> wire.Frame:
        if self.emulation.perturb > 0:
            h = perturbed(h, self.emulation.perturb, self._tamper_rng)
        out_meta = meta.model_dump()
        if not loaded.last:
            tensors = {"x": h}
            if inp.attention_mask is not None:
                tensors["attention_mask"] = inp.attention_mask
            return wire.Frame(meta=out_meta, tensors=tensors)
        if meta.mode == "encode":
            return wire.Frame(meta={"session": meta.session}, tensors={"embedding": h})
        if meta.mode == "logits":
            return wire.Frame(meta={"session": meta.session}, tensors={"logits": h})
        last_position = meta.position + inp.x.shape[1] - 1
        token = sample_token(h, meta.sampling, last_position)
        result = wire.Frame(meta={"session": meta.session, "token": token, "position": last_position + 1})
        if meta.logprobs is not None:  # only the few numbers asked for travel back
            result.meta["logprobs_format"] = LOGPROBS_FORMAT
            result.tensors.update(logprob_tensors(h, token, meta.logprobs.top))
        return result

    async def send(self, hosted: HostedStage, url: str, payload: bytes) -> tuple[bytes, list[dict]]:
        """Post the output to the next stage; a failure keeps the failing stage's fields."""
        next_id = hosted.spec.next.stage_id if hosted.spec.next else "?"
        try:
            resp = await self.paced_post(url, payload, headers=hosted.next_headers(protocol.FRAME_HEADERS))
        except HopError as exc:
            raise protocol.unreachable(exc, "next hop", next_id, url) from exc
        try:
            return protocol.read_raw_answer(resp, next_id)
        except protocol.HopFailure as failure:
            raise failure.relayed(f"next hop {next_id!r} at {url} answered {resp.status_code}") from None

    async def release(self, stage_id: str, session: str) -> list[str]:
        """Free a session's cache here and, best effort, on every later stage."""
        hosted = self._get(stage_id)
        released = [stage_id] if self.sessions.release(stage_id, session) else []
        nxt = hosted.spec.next
        if nxt is not None and self.client is not None:
            try:
                resp = await self.client.delete(
                    protocol.session_url(str(nxt.url), nxt.stage_id, session), headers=hosted.next_headers()
                )
                if resp.status_code == 200:
                    released += resp.json().get("released", [])
            except HopError as exc:
                log.warning("could not release session %s downstream of %s: %r", session, stage_id, exc)
        return released
