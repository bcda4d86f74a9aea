"""The gateway's route provider: where a deployment's sessions enter, and a way around a dead node.

Called on every request (and :meth:`Routes.step_seen` on every token), so
the common path does no I/O: the route is the one the control loop last
committed. Only a failed step reaches broadcast or asks the control loop to
re-plan (through ``replan``), under the deployment's lock, so a recovery and
the loop never roll out at the same time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from starlette.concurrency import run_in_threadpool

from edgeorch.orchestration.clients import ControlPlane, ServiceError
from edgeorch.orchestration.generation import ChainFailure, Route
from edgeorch.orchestration.migration import MovePath
from edgeorch.orchestration.move_cost import MoveEstimate, estimate_move
from edgeorch.orchestration.spotcheck import SpotChecker, Verdict
from edgeorch.schemas.orchestrator import MeasuredView
from services.orchestrator.live import Live, measured
from services.orchestrator.store import OrchestratorStore

log = logging.getLogger(__name__)

RELOAD_WAIT_S = 2.0  # before replaying a session whose stage vanished on a live node
SUSPECT_S = 30.0  # a node a request saw die stays out of plans this long, or until the monitor re-sees it

Replan = Callable[[Live, str, frozenset[str]], Awaitable[bool]]
LogEvent = Callable[[str, str | None, str, dict], Awaitable[None]]


class Routes:
    """The RouteProvider of :mod:`edgeorch.orchestration.generation`, plus what the gateway reports back."""

    def __init__(self, live: dict[str, Live], store: OrchestratorStore, plane: ControlPlane, replan: Replan,
                 metrics=None, secret: str = ""):  # fmt: skip
        self.live = live
        self.secret = secret  # the rollout secret: the stages' data-plane credentials derive from it
        self.store = store
        self.plane = plane
        self.replan = replan
        self.metrics = metrics
        self.suspects: dict[str, float] = {}  # node -> when a request saw it die (monotonic)
        # node -> why: it failed a spot check. Kept until an operator clears it (being alive proves nothing).
        self.distrusted: dict[str, str] = {}
        self.checker: SpotChecker | None = None  # set by the app when spot checks are on
        self.log_event: LogEvent | None = None

    def excluded(self, extra: frozenset[str]) -> set[str]:
        """Nodes a plan must avoid now: recent suspects, nodes that failed a spot check, and ``extra``."""
        now = time.monotonic()
        self.suspects = {n: t for n, t in self.suspects.items() if now - t < SUSPECT_S}
        return set(self.suspects) | set(self.distrusted) | set(extra)

    # ----- spot checks (edgeorch/orchestration/spotcheck.py) ------------------------------------

    def spot_check(self, route: Route, tokens: list[int]) -> None:
        """Maybe check the step that consumed ``tokens`` (RouteProvider; no I/O)."""
        if self.checker is not None:
            self.checker.after_step(route.deployment, route.version, route.stages,
                                    route.headers(route.entry_stage), tokens)  # fmt: skip

    def tainted(self, nodes: set[str]) -> str | None:
        """Why tokens computed on ``nodes`` cannot be trusted, or None (RouteProvider)."""
        for node in nodes:
            if node in self.distrusted:
                return f"node {node} computed part of this answer and failed a spot check: {self.distrusted[node]}"
        return None

    async def settle(self, route: Route, tokens: list[int], since: float) -> None:
        """Hold a whole answer until its untrusted nodes passed a later check (RouteProvider)."""
        if self.checker is not None:
            await self.checker.settle(route.deployment, route.version, route.stages,
                                      route.headers(route.entry_stage), tokens, since)  # fmt: skip

    async def blame(self, verdict: Verdict) -> None:
        """A check failed: its nodes are suspect, an event says why, the deployment is re-planned without them."""
        live = self.live.get(verdict.deployment)
        why = (f"v{verdict.version} of {verdict.deployment}: {verdict.detail} "
               f"(a {verdict.tokens}-token step recomputed on a trusted node)")  # fmt: skip
        new = [n for n in verdict.nodes if n not in self.distrusted]
        if live is None or not new:
            return
        async with live.lock:  # sessions that meet a suspect route wait here for the re-plan
            for node in new:
                self.distrusted[node] = why
            if self.log_event is not None:
                await self.log_event("spot_check_failed", verdict.deployment,
                                     f"{', '.join(new)} failed a spot check and is suspect: {why}",
                                     {"nodes": new, "version": verdict.version, "detail": verdict.detail,
                                      "tokens": verdict.tokens, "max_diff": verdict.max_diff,
                                      "check_s": verdict.seconds})  # fmt: skip
            await self.replan(live, f"spot check failed on {', '.join(new)}", frozenset(new))

    def trust_again(self, node: str) -> bool:
        """An operator's word that ``node`` is fixed; True when it was suspect."""
        if self.checker is not None:
            self.checker.failed_nodes.discard(node)
        return self.distrusted.pop(node, None) is not None

    async def route(self, deployment: str) -> Route:
        """The active route (RouteProvider)."""
        live = self.live.get(deployment)
        if live is None:
            raise ChainFailure(404, f"no deployment {deployment!r}")
        if live.route is None:
            live.route = await self.from_broadcast(live)
        if live.route is None:
            row = await run_in_threadpool(self.store.get, deployment)
            raise ChainFailure(
                503, f"deployment {deployment!r} is {row.state}: {row.reason or 'no plan yet'}"
            )
        if self.tainted({s.node for s in live.route.stages}) is not None:
            async with live.lock:  # a re-plan around a suspect node holds it
                pass
            why = self.tainted({s.node for s in live.route.stages}) if live.route else "no route"
            if why is not None:
                raise ChainFailure(503, f"no route of {deployment!r} without suspect nodes: {why}")
        return live.route

    async def from_broadcast(self, live: Live) -> Route | None:
        """The deployment's active route as broadcast records it (None when it has none or is unreachable)."""
        try:
            view = await self.plane.deployment(live.name)
        except ServiceError as exc:
            log.warning("cannot read %s from broadcast: %s", live.name, exc)
            return None
        if view is None:
            return None
        return Route(live.name, view.active_version, tuple(view.stages), self.secret)

    def newer(self, route: Route) -> Route | None:
        """The committed route when it is newer than the session's (RouteProvider)."""
        live = self.live.get(route.deployment)
        if live is None or live.route is None or live.route.version <= route.version:
            return None
        return live.route if live.policy.adaptive else None

    def move_estimate(self, old: Route, new: Route, position: int) -> MoveEstimate | None:
        """Migrate or replay: the cost model's seconds for both, on the figures of the look that
        chose ``new`` (RouteProvider; no I/O). None when that look's figures do not cover both routes."""
        live = self.live.get(new.deployment)
        if live is None or live.move_basis is None:
            return None
        return estimate_move(live.move_basis, old.stages, new.stages, position)

    async def recover(self, route: Route, failed_node: str | None, error: str) -> Route:
        """A route that avoids ``failed_node`` (RouteProvider): re-plan now if nobody has yet."""
        live = self.live[route.deployment]
        if not live.policy.recover:
            raise ChainFailure(502, f"stage on {failed_node or 'a node'} failed and the policy of "
                                    f"{route.deployment!r} forbids recovery: {error[:300]}")  # fmt: skip
        t0 = time.perf_counter()
        async with live.lock:
            if live.route is not None and live.route.version > route.version:
                return live.route  # another session or the loop already moved on
            if failed_node is None:
                fresh = await self.from_broadcast(live)
                if fresh is not None and fresh.version > route.version:
                    live.route = fresh
                    return fresh
        if failed_node is None:
            # Same version, no dead node: a worker lost its stage or cache
            # (restarted empty) and reloads it from its desired state within a
            # pull interval. Replay on the same route a little later.
            await asyncio.sleep(RELOAD_WAIT_S)
            return live.route or route
        async with live.lock:
            if live.route is not None and live.route.version > route.version:
                return live.route
            self.suspects[failed_node] = time.monotonic()
            trigger = f"stage on {failed_node} failed mid-request ({error[:160]})"
            if not await self.replan(live, trigger, frozenset({failed_node})) and (
                live.route is None or live.route.version <= route.version
            ):
                raise ChainFailure(503, f"could not re-route {route.deployment!r} around {failed_node}")
        log.info("%s: re-routed around %s in %.2fs", route.deployment, failed_node, time.perf_counter() - t0)
        return live.route

    async def session_moved(self, deployment: str, moves: list[MovePath]) -> None:
        """Log how a session moved to newer plans: its KV migrated, or its tokens replayed (and why)."""
        paths = ", ".join(f"v{m.from_version}->v{m.to_version} by {m.path}" for m in moves)
        data = {"moves": [m.as_dict() for m in moves]}
        await run_in_threadpool(self.store.add_event, "session_move", deployment,
                                f"a session moved {paths}", data, time.time())  # fmt: skip

    def step_seen(self, deployment: str, version: int, step_s: float, load: int = 1) -> None:
        """The gateway reports one decode step as it ends (no I/O: called on the request's path).

        ``load``: the deployment's sessions generating when it ended (its own
        traffic, which the controller must not read as a slower plan).
        """
        live = self.live.get(deployment)
        if live is not None:
            live.steps.append((time.monotonic(), version, step_s, load))

    def observe(self, deployment: str, failed: bool) -> None:
        """The gateway reports a finished request (its steps came one by one)."""
        live = self.live.get(deployment)
        if live is None:
            return
        live.requests += 1
        live.failed += int(failed)
        attainment = measured(live).slo_attainment
        if attainment is not None and self.metrics is not None:
            self.metrics.slo_attainment.labels(deployment).set(attainment)

    def measured(self, deployment: str) -> MeasuredView:
        """Median step time on the active version over recent requests."""
        return measured(self.live.get(deployment))
