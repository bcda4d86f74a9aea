"""A worker's side of KV migration: export a session's KV slice, and build a cache by pulling slices.

When a plan changes on purpose (a remap or re-split), a live session need
not replay its whole history on the new chain: the new stages pull the keys
and values of their units from the previous plan's stages and continue at
the same position. A source stage on this same worker is copied in memory
(the units that stay on their node never cross the network); a remote one
is fetched as a KV frame (:mod:`edgeorch.transport.kv_frames`). Reads and
writes of caches run on the compute thread, so they never interleave with a
step of the same session.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import torch

from edgeorch.engine.kv import LeanKVCache
from edgeorch.engine.stage import LoadedStage
from edgeorch.runtime.host import StageHost
from edgeorch.runtime.hosted import HostedStage, planned_cache
from edgeorch.runtime.sessions import UnknownSession
from edgeorch.security.credentials import credential_headers
from edgeorch.transport import kv_frames, wire
from edgeorch.transport.hopclient import HopError
from edgeorch.transport.kv_frames import KVPull, KVPullReport, KVSlice, KVSource


class KVTransferError(Exception):
    """A KV export or pull cannot be done; ``status`` and ``kind`` are what the worker answers."""

    def __init__(self, status: int, detail: str, kind: str = "kv"):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind


def layer_units(loaded: LoadedStage) -> range:
    """The units of a stage that hold KV (its transformer layers)."""
    return range(max(loaded.start, 1), min(loaded.end, loaded.adapter.num_layers + 1))


def _indices(loaded: LoadedStage, cache: Any, units: range) -> range:
    """Where ``units`` live in a cache: a lean cache counts the stage's layers from 0, the reference globally."""
    if isinstance(cache, LeanKVCache):
        first = layer_units(loaded).start
        return range(units.start - first, units.stop - first)
    return range(units.start - 1, units.stop - 1)


def _expected_dtype(cache: Any) -> torch.dtype:
    return cache.dtype if isinstance(cache, LeanKVCache) else torch.float32


def read_slice(loaded: LoadedStage, cache: Any, units: range, start: int, end: int) -> KVSlice:
    """Keys and values of ``units`` at positions ``[start, end)`` from a session's cache."""
    mine = layer_units(loaded)
    if not (mine.start <= units.start < units.stop <= mine.stop):
        raise KVTransferError(422, f"units [{units.start}, {units.stop}) are not layer units of this stage "
                                   f"[{mine.start}, {mine.stop})")  # fmt: skip
    if not 0 <= start < end <= cache.seq_len:
        raise KVTransferError(409, f"positions [{start}, {end}) are not inside the session's {cache.seq_len} "
                                   "tokens", "position")  # fmt: skip
    kv = cache.read_layers(_indices(loaded, cache, units), start, end)
    return KVSlice(units.start, units.stop, start, end, kv)


def fill_cache(loaded: LoadedStage, cache: Any, pieces: list[KVSlice]) -> None:
    """Append slices that together cover every layer unit of the stage, in unit order, to ``cache``."""
    mine = layer_units(loaded)
    pieces = sorted(pieces, key=lambda p: p.unit_start)
    covered = [p.unit_start for p in pieces] + [mine.stop]
    if [mine.start, *[p.unit_end for p in pieces]] != covered:
        raise KVTransferError(422, f"the sources do not cover this stage's layer units [{mine.start}, "
                                   f"{mine.stop}) exactly once")  # fmt: skip
    spans = {(p.start, p.end, p.kv.shape[2]) for p in pieces}
    if len(spans) != 1 or pieces[0].start != cache.seq_len:
        raise KVTransferError(409, f"the slices cover different positions ({sorted(spans)}) or do not start "
                                   f"where the cache ends ({cache.seq_len})", "position")  # fmt: skip
    kv = torch.cat([p.kv for p in pieces]) if len(pieces) > 1 else pieces[0].kv
    if kv.dtype != _expected_dtype(cache):
        raise KVTransferError(422, f"KV of dtype {kv.dtype} cannot fill a cache of {_expected_dtype(cache)}")
    try:
        cache.append_layers(_indices(loaded, cache, mine), kv)
    except ValueError as exc:
        raise KVTransferError(422, str(exc)) from exc


def _hosted(host: StageHost, stage_id: str) -> HostedStage:
    hosted = host.stages.get(stage_id)
    if hosted is None:
        raise KVTransferError(
            404, f"stage {stage_id!r} is not loaded on node {host.node_id}", "stage_missing"
        )
    return hosted


async def export_kv(
    host: StageHost, stage_id: str, session: str, units: range, start: int, end: int
) -> bytes:
    """A session's KV slice on a stage of this worker, as a KV frame."""
    hosted = _hosted(host, stage_id)
    piece = await _local_slice(host, hosted, session, units, start, end)
    return kv_frames.encode_slice(piece)


async def _local_slice(
    host: StageHost, hosted: HostedStage, session: str, units: range, start: int, end: int
) -> KVSlice:
    try:
        cache = host.sessions.peek(hosted.stage_id, session)
    except UnknownSession as exc:
        raise KVTransferError(404, str(exc), "session_missing") from exc
    piece, _ = await host.run_compute(
        lambda: read_slice(hosted.loaded, cache, units, start, end), emulate=False
    )
    return piece


async def pull_kv(host: StageHost, stage_id: str, session: str, pull: KVPull, max_bytes: int) -> KVPullReport:
    """Build ``session``'s cache on ``stage_id`` from the previous plan's stages; what it moved."""
    t0 = time.perf_counter()
    hosted = _hosted(host, stage_id)
    mine = layer_units(hosted.loaded)
    if len(mine) == 0:  # no layers, no cache: the stage continues as it is
        return KVPullReport(stage_id=stage_id, session=session, position=pull.position, units=[0, 0],
                            bytes_remote=0, bytes_local=0, seconds=0.0)  # fmt: skip
    wanted = [(s, range(max(s.start, mine.start), min(s.end, mine.stop))) for s in pull.sources]
    wanted = [(s, units) for s, units in wanted if len(units) > 0]
    fetched = await asyncio.gather(
        *(_fetch(host, s, session, units, pull.position, max_bytes) for s, units in wanted)
    )
    pieces = [piece for piece, _ in fetched]
    cache = planned_cache(hosted)
    await host.run_compute(lambda: fill_cache(hosted.loaded, cache, pieces), emulate=False)
    host.sessions.install(stage_id, session, cache)
    remote = sum(n for _, n in fetched)
    local = sum(p.kv.numel() * p.kv.element_size() for p, n in fetched if n == 0)
    return KVPullReport(stage_id=stage_id, session=session, position=pull.position,
                        units=[mine.start, mine.stop], bytes_remote=remote, bytes_local=local,
                        seconds=time.perf_counter() - t0)  # fmt: skip


async def _fetch(
    host: StageHost, source: KVSource, session: str, units: range, position: int, max_bytes: int
) -> tuple[KVSlice, int]:
    """One source's slice and the frame bytes that crossed the network for it (0 for a stage on this worker)."""
    local = host.stages.get(source.stage_id)
    if local is not None:
        return await _local_slice(host, local, session, units, 0, position), 0
    if host.client is None:
        raise RuntimeError("StageHost.start() was not awaited")
    url = kv_frames.kv_url(source.url, source.stage_id, session)
    query = f"?unit_start={units.start}&unit_end={units.stop}&start=0&end={position}"
    try:
        resp = await host.client.request("GET", url + query, headers=credential_headers(source.credential))
    except HopError as exc:
        raise KVTransferError(502, f"KV source {source.stage_id!r} at {source.url} unreachable: {exc!r}",
                              "unreachable") from exc  # fmt: skip
    if resp.status_code != 200:
        raise KVTransferError(502, f"KV source {source.stage_id!r} answered {resp.status_code}: "
                                   f"{resp.text[:300]}")  # fmt: skip
    try:
        piece = kv_frames.decode_slice(resp.content, (units.start, units.stop), (0, position), max_bytes)
    except (wire.FrameError, kv_frames.KVFrameError) as exc:
        raise KVTransferError(502, f"KV source {source.stage_id!r} sent a bad KV frame: {exc}") from exc
    return piece, len(resp.content)
