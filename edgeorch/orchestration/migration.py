"""Carry a live session to a newer plan by moving its KV caches instead of replaying its tokens.

At a planned change (a remap or re-split the controller committed), every
stage of the new route is asked to pull the session's keys and values for
its units from the old route's stages (``POST .../kv/pull``, served by
:mod:`edgeorch.runtime.kv_transfer`): units that stay on their node are
copied in that worker's memory, the others cross the network once, as KV
frames. The session then continues at the same position on the new route,
with the same session id. When any pull fails (a source is gone, a cache
expired, the new stage has no room), the caller falls back to a replay and
the move says which path it took and why.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from edgeorch.schemas.rollout import PlacedStage
from edgeorch.security.credentials import credential_headers
from edgeorch.transport import kv_frames
from edgeorch.transport.hopclient import HopClient, HopError
from edgeorch.transport.kv_frames import KVPull, KVPullReport, KVSource

JSON_HEADERS = {"content-type": "application/json"}


class MigrationFailed(Exception):
    """A KV migration did not complete; the message says which stage refused and why."""


@dataclass
class MovePath:
    """How one session moved from one plan version to the next."""

    from_version: int
    to_version: int
    path: str  # "migrate" (KV copied) or "replay" (tokens re-run as a prefill)
    position: int  # tokens the session held when it moved
    bytes_remote: int = 0  # KV bytes that crossed the network
    bytes_local: int = 0  # KV bytes copied inside a worker (units that stayed on their node)
    seconds: float = 0.0  # how long the migration (or the failed attempt) took
    reason: str = ""  # why a replay: migration off, predicted cheaper, or the migration's failure
    predicted_migrate_s: float | None = None  # the cost model's figures when the gateway had them
    predicted_replay_s: float | None = None

    def as_dict(self) -> dict:
        """The move as JSON-safe fields (for events and logs)."""
        return asdict(self)


def can_migrate(old: Sequence[PlacedStage], new: Sequence[PlacedStage]) -> str | None:
    """Why KV cannot move between two routes (None when it can): it must be the same model and format."""
    models = {(s.model, s.format) for s in (*old, *new)}
    if len(models) != 1:
        return f"the plans differ in model or format ({sorted(models)}): KV would not match"
    return None


async def migrate_session(
    http: HopClient,
    old: Sequence[PlacedStage],
    new: Sequence[PlacedStage],
    session: str,
    position: int,
    timeout_s: float = 60.0,
    credential_of: Callable[[str], str | None] = lambda _stage_id: None,
) -> list[KVPullReport]:
    """Have every stage of ``new`` pull ``session``'s KV (``position`` tokens) from ``old``; their reports.

    ``credential_of`` gives each stage's data-plane credential: the pull is
    sent with the new stage's, and each source's travels in the pull so the
    new stage can read that source's KV.
    """
    pull = KVPull(
        position=position,
        sources=[
            KVSource(
                stage_id=s.stage_id, url=s.url, start=s.start, end=s.end, credential=credential_of(s.stage_id)
            )
            for s in old
        ],
    )
    body = pull.model_dump_json().encode()

    async def one(stage: PlacedStage) -> KVPullReport:
        url = kv_frames.pull_url(stage.url, stage.stage_id, session)
        try:
            headers = {**JSON_HEADERS, **credential_headers(credential_of(stage.stage_id))}
            resp = await http.post(url, content=body, headers=headers, timeout_s=timeout_s)
        except HopError as exc:
            raise MigrationFailed(f"stage {stage.stage_id} at {stage.url} unreachable: {exc!r}") from exc
        if resp.status_code != 200:
            raise MigrationFailed(f"stage {stage.stage_id} refused the pull ({resp.status_code}): "
                                  f"{resp.text[:300]}")  # fmt: skip
        return KVPullReport.model_validate(resp.json())

    return list(await asyncio.gather(*(one(s) for s in new)))


async def try_migrate(
    http: HopClient, old_version: int, old: Sequence[PlacedStage], new_version: int,
    new: Sequence[PlacedStage], session: str, position: int,
    credential_of: Callable[[str], str | None] = lambda _stage_id: None,
) -> MovePath:  # fmt: skip
    """Migrate a session's KV if possible; the move's path ("migrate", or "replay" with the reason)."""
    move = MovePath(old_version, new_version, "replay", position)
    move.reason = can_migrate(old, new) or ""
    if move.reason:
        return move
    t0 = time.perf_counter()
    try:
        reports = await migrate_session(http, old, new, session, position, credential_of=credential_of)
    except MigrationFailed as exc:
        move.reason = str(exc)
    else:
        move.path = "migrate"
        move.bytes_remote = sum(r.bytes_remote for r in reports)
        move.bytes_local = sum(r.bytes_local for r in reports)
    move.seconds = time.perf_counter() - t0
    return move
