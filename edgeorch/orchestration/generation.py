"""Run a session through a deployment's chain, and carry it over when a stage dies.

The gateway keeps every session's tokens (prompt and generated) itself. When
a step fails because a stage is gone — the entry refuses connections, or a
stage answers that its next hop is unreachable or timed out — it asks the
route provider (the controller) for a route without that node and replays
all the tokens as one prefill on a fresh session: the new chain rebuilds its
KV caches from them and samples the next token, which greedy decoding (or a
seeded sampler, whose draw depends only on seed and position) makes the
same token the lost chain would have produced. A step that finds its stage
or cache gone without a dead node (a rollout released the old version, a
worker restarted empty) is replayed on the current route the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from edgeorch.orchestration.batched_steps import StepBatcher
from edgeorch.orchestration.migration import MovePath, try_migrate
from edgeorch.orchestration.move_cost import MoveEstimate
from edgeorch.schemas.rollout import PlacedStage
from edgeorch.schemas.stage import Sampling
from edgeorch.security.credentials import credential_headers, stage_credential
from edgeorch.transport import protocol, wire
from edgeorch.transport.hopclient import HopClient, HopError
from edgeorch.transport.protocol import HopFailure

log = logging.getLogger(__name__)

_background: set[asyncio.Task] = set()  # fire-and-forget releases, referenced until done


@dataclass(frozen=True)
class Route:
    """A deployment's chain in one plan version: its stages in order, the first one the entry."""

    deployment: str
    version: int
    stages: tuple[PlacedStage, ...]
    # The rollout secret the stages' credentials derive from (edgeorch.security); "": open stages.
    secret: str = field(default="", repr=False, compare=False)

    def credential(self, stage_id: str) -> str | None:
        """The data-plane credential of ``stage_id`` (one of this route's stages); None: an open stage."""
        return stage_credential(self.secret, stage_id) if self.secret else None

    def headers(self, stage_id: str, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` plus the data-plane credential of ``stage_id`` (one of this route's stages)."""
        return {**(base or {}), **credential_headers(self.credential(stage_id))}

    @property
    def entry_url(self) -> str:
        """The worker new sessions enter at."""
        return self.stages[0].url

    @property
    def entry_stage(self) -> str:
        """The stage id new sessions enter at."""
        return self.stages[0].stage_id

    def node_of(self, stage_id: str | None) -> str | None:
        """The node that hosts ``stage_id`` in this route (None when it is not one of its stages)."""
        return next((s.node for s in self.stages if s.stage_id == stage_id), None)


class RouteProvider(Protocol):
    """What the gateway needs from the controller."""

    async def route(self, deployment: str) -> Route:
        """The active route of a deployment."""

    async def recover(self, route: Route, failed_node: str | None, error: str) -> Route:
        """A route that avoids ``failed_node`` (re-planning if needed), or the current one."""

    def newer(self, route: Route) -> Route | None:
        """The deployment's committed route if it is newer than ``route`` (no I/O), else None."""

    def move_estimate(self, old: Route, new: Route, position: int) -> MoveEstimate | None:
        """Predicted seconds to migrate or to replay a session moving from ``old`` to ``new``
        (no I/O); None: no prediction, migrate when it can."""

    def spot_check(self, route: Route, tokens: list[int]) -> None:
        """Maybe check the step that consumed ``tokens`` on a trusted node (no I/O; spotcheck.py)."""

    def tainted(self, nodes: set[str]) -> str | None:
        """Why tokens computed on ``nodes`` are not to be trusted (a node failed a spot check), or None."""

    async def settle(self, route: Route, tokens: list[int], since: float) -> None:
        """Wait until the route's untrusted nodes passed a check that started after ``since`` (monotonic)."""


class ChainFailure(RuntimeError):
    """A step failed and cannot be carried over; ``status`` is what the client should see."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


class SessionTainted(ChainFailure):
    """A node that computed some of this session's tokens failed a spot check: they may be wrong.

    Tokens already given out cannot be taken back, so the session ends here; an
    answer not yet sent (a whole, non-streamed one) is generated again from its
    prompt on a route without the node (services/orchestrator/openai_routes.py).
    """


@dataclass
class StepFailure(Exception):
    """One step failed: which node died (None: none did), and whether a replay can help."""

    status: int
    detail: str
    failed_node: str | None
    replayable: bool


@dataclass
class SessionStats:
    """What one generation measured: per-step wall times, recoveries, tokens."""

    step_s: list[float] = field(default_factory=list)
    recoveries: int = 0
    moves: int = 0  # times the session moved to a newer plan mid-generation
    max_gap_s: float = 0.0
    move_paths: list[MovePath] = field(default_factory=list)  # how each move went: KV migrated or replayed
    # Where each recovery's gap went (seconds): "failed" (last token until the failed step
    # came back: the step itself plus detecting the loss), "reroute" (the route provider's
    # answer: plan, loads, commit), "replay" (the replayed prefill until its token).
    recovery_phases: list[dict[str, float]] = field(default_factory=list)


def _classify(route: Route, failure: HopFailure) -> StepFailure:
    """What the gateway does about a failed step, read from the failure's fields."""
    if failure.kind in protocol.NODE_LOST:
        node = failure.failed_node or route.node_of(failure.failed_stage)
        return StepFailure(failure.status, failure.detail, node, True)
    # The stage or session is gone (released by a rollout, worker restarted) or
    # the cache is not where the step expects it: both heal by a replay.
    return StepFailure(failure.status, failure.detail, None, failure.kind in protocol.STATE_LOST)


async def _step(http: HopClient, route: Route, tensors: dict[str, torch.Tensor], **meta) -> wire.Frame:
    url = protocol.forward_url(route.entry_url, route.entry_stage)
    try:
        resp = await http.post(
            url,
            content=protocol.step_body(tensors, **meta),
            headers=route.headers(route.entry_stage, protocol.FRAME_HEADERS),
        )
        frame, _ = protocol.read_answer(resp, route.entry_stage)
    except HopError as exc:
        failure = protocol.unreachable(
            exc, "entry stage", route.entry_stage, url, route.node_of(route.entry_stage)
        )
        raise _classify(route, failure) from exc
    except HopFailure as failure:
        raise _classify(route, failure) from None
    return frame


async def _batched_step(
    batcher: StepBatcher, route: Route, stream: object, tensors: dict[str, torch.Tensor], **meta
) -> wire.Frame:
    """Like :func:`_step`, the step sent in a multi-session frame with other sessions' (batched_steps.py)."""
    try:
        return await batcher.step(route, stream, tensors["x"], meta)
    except HopError as exc:
        url = protocol.forward_url(route.entry_url, route.entry_stage)
        failure = protocol.unreachable(
            exc, "entry stage", route.entry_stage, url, route.node_of(route.entry_stage)
        )
        raise _classify(route, failure) from exc
    except HopFailure as failure:
        raise _classify(route, failure) from None


async def generate(
    http: HopClient,
    routes: RouteProvider,
    deployment: str,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: Sampling,
    stop_ids: set[int],
    stats: SessionStats,
    max_recoveries: int = 3,
    on_step: Callable[[int, float], None] | None = None,
    logprobs: int | None = None,
    on_result: Callable[[wire.Frame], None] | None = None,
    migrate_kv: bool = True,
    settle: bool = False,
    batcher: StepBatcher | None = None,
) -> AsyncIterator[int]:
    """Yield generated token ids one by one, carrying the session over failed stages.

    ``on_step(version, seconds)`` hears every decode step as it ends — one
    token on a session whose caches hold the rest, not a prompt's or a
    replay's prefill — so the controller sees a plan slow down while its
    requests are still running.

    ``logprobs`` (the number of alternatives, 0..20) asks the last stage for
    each sampled token's log-probabilities; ``on_result`` hears every
    step's result frame, just before its token is yielded.

    ``migrate_kv`` moves a session's KV caches to a newer plan's stages
    (:mod:`edgeorch.orchestration.migration`) instead of replaying its
    tokens; a replay remains the fallback.

    ``batcher`` sends this session's decode tokens together with other
    sessions' (one frame per hop for all of them); prefills, replays and
    steps that ask for log-probabilities still go alone.
    """
    stream = object()  # this generation, to the batcher (its session id changes on a replay)
    try:
        async for token in _generate(http, routes, deployment, prompt_ids, max_new_tokens, sampling,
                                     stop_ids, stats, max_recoveries, on_step, logprobs, on_result,
                                     migrate_kv, settle, batcher, stream):  # fmt: skip
            yield token
    finally:
        if batcher is not None:
            batcher.leave(stream)


async def _generate(
    http: HopClient,
    routes: RouteProvider,
    deployment: str,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: Sampling,
    stop_ids: set[int],
    stats: SessionStats,
    max_recoveries: int,
    on_step: Callable[[int, float], None] | None,
    logprobs: int | None,
    on_result: Callable[[wire.Frame], None] | None,
    migrate_kv: bool,
    settle: bool,
    batcher: StepBatcher | None,
    stream: object,
) -> AsyncIterator[int]:
    extra = {} if logprobs is None else {"logprobs": {"top": logprobs}}
    route = await routes.route(deployment)
    tokens = list(prompt_ids)
    generated: list[int] = []
    session, sent = uuid.uuid4().hex, 0  # tokens the current session's caches hold
    last_token_at = time.perf_counter()
    recovering: dict[str, float] | None = None  # the phases of a recovery whose replay is under way
    used = {s.node for s in route.stages}  # every node that computed a step of this session
    while len(generated) < max_new_tokens:
        if (why := routes.tainted(used)) is not None:
            _in_background(release_everywhere(http, route, session))
            raise SessionTainted(502, why)
        last = len(generated) == max_new_tokens - 1
        moved = routes.newer(route) if generated else None
        if moved is not None:
            # A new plan was committed while this session ran on the old one:
            # move it now rather than finish on a plan the orchestrator has
            # just judged worse, and let the old one drain.
            session, sent = await _move(http, routes, route, moved, session, sent, stats, migrate_kv)
            route = moved
            used |= {s.node for s in route.stages}
        x = torch.tensor([tokens[sent:]], dtype=torch.int64)
        t0, step_began = time.perf_counter(), time.monotonic()
        meta = {"session": session, "position": sent, "mode": "generate", "sampling": sampling.model_dump(),
                "release": last, **extra}  # fmt: skip
        try:
            if batcher is not None and sent > 0 and x.shape[1] == 1 and not extra:
                frame = await _batched_step(batcher, route, stream, {"x": x}, **meta)
            else:
                frame = await _step(http, route, {"x": x}, **meta)
        except StepFailure as failure:
            if not failure.replayable or stats.recoveries >= max_recoveries:
                raise ChainFailure(failure.status if failure.status < 500 else 502, failure.detail) from None
            t_failed = time.perf_counter()
            stats.recoveries += 1
            log.warning("session on %s v%d failed at token %d (%s); recovering", deployment, route.version,
                        len(generated), failure.detail[:300])  # fmt: skip
            # The caches the session built on the surviving stages would keep
            # the old version from draining: free them, without waiting.
            _in_background(release_everywhere(http, route, session))
            route = await routes.recover(route, failure.failed_node, failure.detail)
            used |= {s.node for s in route.stages}
            session, sent = uuid.uuid4().hex, 0
            recovering = {"failed": t_failed - last_token_at, "reroute": time.perf_counter() - t_failed}
            continue
        step_s = time.perf_counter() - t0
        stats.step_s.append(step_s)
        if on_step is not None and sent > 0:
            on_step(route.version, step_s)
        token = int(frame.meta["token"])
        if recovering is not None:
            recovering["replay"] = step_s
            stats.recovery_phases.append(recovering)
            log.info("session on %s recovered on v%d: failed step %.2fs after the last token, re-route %.2fs, "
                     "replay %.2fs", deployment, route.version, recovering["failed"], recovering["reroute"],
                     step_s)  # fmt: skip
            recovering = None
        routes.spot_check(route, tokens)  # the tokens this step consumed (the cache's and the new ones)
        if on_result is not None:
            on_result(frame)
        now = time.perf_counter()
        stats.max_gap_s = max(stats.max_gap_s, now - last_token_at) if generated else stats.max_gap_s
        last_token_at = now
        sent = len(tokens)
        tokens.append(token)
        generated.append(token)
        if last or token in stop_ids:
            if settle:
                await routes.settle(route, tokens[:-1], step_began)
            if (why := routes.tainted(used)) is not None:  # not complete while a check says it is wrong
                raise SessionTainted(502, why)
        yield token
        if token in stop_ids:
            if not last:
                await release(http, route, session)
            return


async def _move(
    http: HopClient,
    routes: RouteProvider,
    old: Route,
    new: Route,
    session: str,
    sent: int,
    stats: SessionStats,
    migrate_kv: bool,
) -> tuple[str, int]:
    """Carry a session to ``new``: its KV pulled there, or a replay; returns (session id, tokens held)."""
    estimate = routes.move_estimate(old, new, sent) if migrate_kv else None
    if not migrate_kv:
        move = MovePath(old.version, new.version, "replay", sent, reason="migration is off")
    elif estimate is not None and estimate.path == "replay":
        move = MovePath(old.version, new.version, "replay", sent, reason=f"cheaper: {estimate.describe()}")
    else:
        move = await try_migrate(http, old.version, old.stages, new.version, new.stages, session, sent,
                                 credential_of=lambda stage_id: old.credential(stage_id) or new.credential(stage_id))  # fmt: skip
    if estimate is not None:
        move.predicted_migrate_s, move.predicted_replay_s = estimate.migrate_s, estimate.replay_s
    stats.moves += 1
    stats.move_paths.append(move)
    log.info("session moved %s v%d -> v%d by %s at %d tokens (%d bytes over the network, %d copied "
             "locally, %.3fs)%s", old.deployment, old.version, new.version, move.path, sent, move.bytes_remote,
             move.bytes_local, move.seconds, f": {move.reason[:200]}" if move.reason else "")  # fmt: skip
    _in_background(release_everywhere(http, old, session))
    if move.path == "migrate":
        return session, sent
    if migrate_kv:  # a failed pull may have left caches on some new stages
        _in_background(release_everywhere(http, new, session))
    return uuid.uuid4().hex, 0


async def release(http: HopClient, route: Route, session: str) -> None:
    """Free a session's caches along the chain (best effort)."""
    try:
        await http.delete(
            protocol.session_url(route.entry_url, route.entry_stage, session),
            headers=route.headers(route.entry_stage),
        )
    except HopError:
        pass


def _in_background(coro) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


async def release_everywhere(http: HopClient, route: Route, session: str) -> None:
    """Free a session on every stage of a broken chain (a release at the entry stops at the gap)."""
    for stage in route.stages:
        try:
            await http.delete(protocol.session_url(stage.url, stage.stage_id, session), timeout_s=2.0,
                              headers=route.headers(stage.stage_id))  # fmt: skip
        except HopError:
            pass  # that node is the dead one, or its caches expire on their own


async def encode(
    http: HopClient,
    routes: RouteProvider,
    deployment: str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_recoveries: int = 2,
) -> torch.Tensor:
    """Pooled embeddings from an encoder deployment, one row per sequence."""
    route = await routes.route(deployment)
    for attempt in range(max_recoveries + 1):
        try:
            frame = await _step(http, route, {"x": input_ids, "attention_mask": attention_mask},
                                session=uuid.uuid4().hex, mode="encode")  # fmt: skip
            return frame.tensors["embedding"]
        except StepFailure as failure:
            if not failure.replayable or attempt == max_recoveries:
                raise ChainFailure(failure.status if failure.status < 500 else 502, failure.detail) from None
            route = await routes.recover(route, failure.failed_node, failure.detail)
    raise AssertionError("unreachable")
