"""The Adaptive Orchestrator's control loop: deploy, re-evaluate, roll out, recover (DESIGN.md §6).

One task per deployment waits for a reason to look again — a monitor event,
the timer, a measured SLO miss — and then re-plans it with fresh
measurements: nodes and links from the monitor, a candidate from the
splitter, a decision from :mod:`edgeorch.orchestration.decide`, a rollout by
broadcast. Every step that changes or refuses to change a plan is written to
the decision log with its figures. A per-deployment lock serialises the loop
and the gateway's recoveries, so two rollouts of one deployment never race.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool

from edgeorch import bus
from edgeorch.orchestration.clients import ControlPlane, ServiceError
from edgeorch.orchestration.decide import decide, measured_slowdown
from edgeorch.orchestration.generation import ChainFailure, Route
from edgeorch.orchestration.snapshot import NoNodesError, cluster_from_monitor, plan_request, predict
from edgeorch.schemas.orchestrator import MeasuredView, PredictedView, QosPolicy, StageView
from edgeorch.schemas.profile import ModelProfile, profile_key
from services.orchestrator.store import OrchestratorStore

log = logging.getLogger(__name__)

MEASURE_SKIP_STEPS = 16  # steps on a new version before its measurement starts
MEASURE_STEPS = 32  # steps that make one measurement
RELOAD_WAIT_S = 2.0  # before replaying a session whose stage vanished on a live node
SUSPECT_S = 30.0  # a node a request saw die stays out of plans this long, or until the monitor re-sees it
URGENT_POLL_S = 0.1  # how often the pause between two looks checks whether it should end early


@dataclass
class Live:
    """What the controller keeps in memory per deployment (all of it can be rebuilt)."""

    name: str
    model: str
    policy: QosPolicy
    profile: ModelProfile
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    triggers: list[str] = field(default_factory=list)
    route: Route | None = None
    predicted: PredictedView | None = None
    steps: deque = field(default_factory=lambda: deque(maxlen=256))  # (ended_at monotonic, version, step_s)
    requests: int = 0
    failed: int = 0
    measured_versions: set[int] = field(default_factory=set)
    last_periodic: float = field(default_factory=time.monotonic)
    pending: float | None = None  # since when a change has been predicted to pay off (monotonic)
    task: asyncio.Task | None = None

    @property
    def profile_key(self) -> str:
        """What nodes calibrate this deployment under: its model in its weight format."""
        return profile_key(self.model, self.policy.weight_format)


class Controller:
    """Deployments in memory, the control loop per deployment, and the gateway's route provider."""

    def __init__(self, store: OrchestratorStore, plane: ControlPlane, settings, metrics, publisher=None):
        self.store = store
        self.publisher = publisher
        self.plane = plane
        self.settings = settings
        self.metrics = metrics
        self.live: dict[str, Live] = {}
        self.suspects: dict[str, float] = {}

    # ----- lifecycle -----------------------------------------------------------

    def start(self, live: Live) -> None:
        """Run the deployment's loop."""
        self.live[live.name] = live
        live.task = asyncio.create_task(self._loop(live), name=f"control-{live.name}")
        self.poke(live.name, "deployment created")

    async def stop(self, name: str | None = None) -> None:
        """Stop one deployment's loop (or all of them)."""
        for live in [self.live[name]] if name else list(self.live.values()):
            if live.task is not None:
                live.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await live.task
            if name:
                self.live.pop(name, None)

    def poke(self, name: str, trigger: str) -> None:
        """Ask the deployment's loop to look again, now."""
        live = self.live.get(name)
        if live is not None:
            live.triggers.append(trigger)
            live.wake.set()

    def poke_all(self, trigger: str) -> None:
        """Every deployment looks again (a monitor event)."""
        for name in self.live:
            self.poke(name, trigger)

    def node_seen(self, node_id: str) -> None:
        """The monitor saw the node alive again: it may host stages again."""
        self.suspects.pop(node_id, None)

    async def _loop(self, live: Live) -> None:
        backoff = 1.0
        while True:
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(live.wake.wait(), timeout=self.settings.replan_interval_s)
                await asyncio.sleep(self.settings.debounce_s)  # events come in bursts
                live.wake.clear()
                trigger = ", ".join(dict.fromkeys(live.triggers)) or "timer"
                live.triggers.clear()
                trigger = self._slo_trigger(live) or trigger
                trigger = await self._gate(live, trigger)
                if trigger is None:
                    continue
                async with live.lock:
                    await self._evaluate(live, trigger)
                await self._record_measured(live)
                backoff = 1.0
                await self._pause(live)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must outlive any single failure
                log.exception("control loop of %s failed; retrying in %.1fs", live.name, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def _pause(self, live: Live) -> None:
        """Wait ``min_eval_interval_s`` before the next look, unless news arrives on a slowed plan.

        Triggers that arrive meanwhile are kept and looked at together: each
        look costs the splitter's CPU, taken from the workers on a small
        shared host. But when the current plan's own decode steps have slowed
        down (:meth:`_slowed`) and a trigger has arrived — typically the
        monitor's report of what slowed — the next look starts at once: every
        session is paying for the wait.
        """
        deadline = time.monotonic() + self.settings.min_eval_interval_s
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, URGENT_POLL_S))
            if live.triggers and self._slowed(live) is not None:
                return

    def _slowed(self, live: Live) -> float | None:
        """How many times slower the current plan's recent decode steps run, when ``confirm_slowdown`` or more."""
        threshold = self.settings.confirm_slowdown
        if threshold <= 0 or live.route is None or not live.policy.adaptive:
            return None
        slowdown = measured_slowdown(live.steps, live.route.version, time.monotonic())
        return slowdown if slowdown is not None and slowdown >= threshold else None

    async def _gate(self, live: Live, trigger: str) -> str | None:
        """The trigger to evaluate on, or None when the policy says not to look now.

        ``adaptive: false`` keeps the first plan (the static baselines of the
        evidence benchmark); with ``replan_every_s`` it is re-planned on that
        period only, as Petals rebalances on a timer.
        """
        if live.policy.adaptive:
            return trigger
        if (await run_in_threadpool(self.store.get, live.name)).version is None:
            return trigger  # not deployed yet: the first plan is always made
        every = live.policy.replan_every_s
        now = time.monotonic()
        if every is None or now - live.last_periodic < every:
            return None
        live.last_periodic = now
        return f"periodic re-plan (every {every:g}s)"

    # ----- evaluation ----------------------------------------------------------

    async def _evaluate(self, live: Live, trigger: str, exclude: frozenset[str] = frozenset()) -> bool:
        """Re-plan the deployment with fresh measurements; True when a new plan was committed."""
        active = await run_in_threadpool(self.store.active_plan, live.name)
        current = [(s.node, s.start, s.end) for s in active.stages] if active else None
        try:
            nodes, links = await asyncio.gather(self.plane.nodes(live.profile_key), self.plane.links())
            if active is None:
                await self.plane.request_profile(live.profile_key)
            cluster = cluster_from_monitor(nodes, links, live.policy.nodes, self._excluded(exclude))
            req = plan_request(live.profile, cluster, live.policy, current, self.settings.plan_time_limit_s)
            answer = await self.plane.plan(req)
        except NoNodesError as exc:
            await self._set_state(live, "pending" if active is None else "degraded", str(exc))
            return False
        except ServiceError as exc:
            infeasible = exc.service == "splitter" and exc.status == 422
            # Failed only when nothing serves; with an active plan it may still answer.
            state = "degraded" if active is not None else ("failed" if infeasible else "pending")
            await self._set_state(live, state, str(exc))
            if infeasible:
                await self._log("infeasible", live.name, str(exc), {"detail": exc.detail})
            return False
        cur_pred = predict(req, current) if current else None
        live.predicted = cur_pred or live.predicted
        stages = [(s["node"], s["start"], s["end"]) for s in answer["stages"]]
        cand_pred = predict(req, stages)
        if active is None:
            return await self._roll_out(live, "deploy", f"{trigger}: first plan", stages, cluster.urls,
                                        cand_pred, answer)  # fmt: skip
        revision = answer.get("revision") or {"kind": "resplit", "current_feasible": cur_pred is not None}
        slowed = self._slowed(live)
        decision = decide(revision_kind=revision["kind"], current_feasible=revision["current_feasible"],
                          current=cur_pred, candidate=cand_pred, policy=live.policy, now=time.time(),
                          last_change_at=(await run_in_threadpool(self.store.get, live.name)).last_change_at,
                          trigger=trigger, slowed=slowed)  # fmt: skip
        if not decision.change:
            live.pending = None
            if trigger != "timer" or decision.gain is not None and decision.gain > 0:
                await self._log("keep", live.name, decision.reason, {
                    "predicted": cur_pred.model_dump() if cur_pred else None,
                    "candidate": cand_pred.model_dump() if cand_pred else None, "gain": decision.gain})  # fmt: skip
            if cur_pred is not None:
                await self._set_state(live, "ready", None)
            return False
        reason = decision.reason
        if revision["current_feasible"] and not exclude and live.policy.adaptive:
            confirmation = self._confirmation(live, slowed)
            if confirmation is None:
                await self._log("keep", live.name, f"{decision.reason}; waiting {self.settings.confirm_s:.1f}s "
                                "to see the gain again", {"candidate_stages": stages})  # fmt: skip
                return False
            reason = f"{reason}; {confirmation}"
        kind = "recover" if exclude else decision.kind
        return await self._roll_out(live, kind, reason, stages, cluster.urls, cand_pred, answer)

    def _confirmation(self, live: Live, slowed: float | None) -> str | None:
        """What confirms a voluntary change now, or None (then a look ``confirm_s`` later may).

        Speeds measured on a busy shared host swing by ±25 % for a second or
        two, which alone predicts 20–45 % gains for plans that only shuffle
        nodes; a real change (a node 4x slower) keeps predicting its gain.
        So a gain must be predicted on every look for ``confirm_s`` — unless the
        current plan's own decode steps already run ``confirm_slowdown`` times
        their earlier median: then the change is real and measured, and
        waiting only keeps every session on the slow plan. The candidate may
        differ between two looks (its boundaries move with the noise); the
        later one is rolled out. ``slowed`` is this look's :meth:`_slowed`.
        """
        now = time.monotonic()
        if slowed is not None:
            live.pending = None
            return f"confirmed by measurement: decode steps {slowed:.2f}x their earlier median"
        if live.pending is not None and now - live.pending >= self.settings.confirm_s:
            live.pending = None
            return f"confirmed: the gain was predicted again on every look for {self.settings.confirm_s:g}s"
        if live.pending is None:
            live.pending = now
        loop = asyncio.get_running_loop()
        loop.call_later(self.settings.confirm_s + 0.05, self.poke, live.name, "confirming a candidate")
        return None

    def _excluded(self, extra: frozenset[str]) -> set[str]:
        now = time.monotonic()
        self.suspects = {n: t for n, t in self.suspects.items() if now - t < SUSPECT_S}
        return set(self.suspects) | set(extra)

    async def _roll_out(self, live: Live, kind: str, reason: str, stages: list[tuple[str, int, int]],
                        urls: dict[str, str], predicted: PredictedView | None, answer: dict) -> bool:  # fmt: skip
        """Hand a plan to broadcast, wait for COMMIT, record it; True when committed."""
        body = [{"node_id": n, "url": urls[n], "start": a, "end": b} for n, a, b in stages]
        t0 = time.time()
        try:
            rollout = await self.plane.start_rollout(
                live.name, live.model, body, self.settings.rollout_wait_s, live.policy.weight_format
            )
            live.pending = None
        except ServiceError as exc:
            await self._log("rollout_refused", live.name, f"{kind} refused: {exc}", {"stages": body})
            return False
        version = rollout["version"]
        views = [StageView(node=n, start=a, end=b, url=urls[n]) for n, a, b in stages]
        await run_in_threadpool(self.store.add_plan, live.name, version, kind, reason, views, predicted,
                                int(answer.get("migration_bytes", 0)), t0)  # fmt: skip
        log.info("%s v%d (%s): %s -> %s", live.name, version, kind, reason,
                 " | ".join(f"{n}[{a},{b})" for n, a, b in stages))  # fmt: skip
        try:
            view = await self.plane.wait_rollout(rollout["id"], self.settings.rollout_wait_s)
        except ServiceError as exc:
            view = {"phase": "unknown", "reason": str(exc)}
        committed = view["phase"] in ("committed", "completed")
        await run_in_threadpool(self.store.finish_plan, live.name, version, committed, time.time(), True)
        data = {"version": version, "stages": [v.model_dump() for v in views], "rollout_id": rollout["id"],
                "predicted": predicted.model_dump() if predicted else None, "took_s": time.time() - t0,
                "migration_bytes": answer.get("migration_bytes", 0),
                "solver": answer.get("solver", {}).get("name")}  # fmt: skip
        if not committed:
            await self._log(
                "rollout_aborted", live.name, f"{kind} v{version} aborted: {view.get('reason')}", data
            )
            return False
        self.metrics.replans.labels(kind).inc()
        await self._log(kind, live.name, f"v{version} committed: {reason}", data)
        live.route = Route(live.name, version, urls[stages[0][0]], f"{live.name}.v{version}.s0",
                           {n: urls[n] for n, _, _ in stages},
                           tuple((f"{live.name}.v{version}.s{i}", urls[n]) for i, (n, _, _) in enumerate(stages)))  # fmt: skip
        live.predicted = predicted
        await self._set_state(live, "ready", None)
        return True

    # ----- the gateway's side ----------------------------------------------------

    async def route(self, deployment: str) -> Route:
        """The active route (RouteProvider)."""
        live = self.live.get(deployment)
        if live is None:
            raise ChainFailure(404, f"no deployment {deployment!r}")
        if live.route is None:
            live.route = await self._route_from_broadcast(live)
        if live.route is None:
            row = await run_in_threadpool(self.store.get, deployment)
            raise ChainFailure(
                503, f"deployment {deployment!r} is {row.state}: {row.reason or 'no plan yet'}"
            )
        return live.route

    async def _route_from_broadcast(self, live: Live) -> Route | None:
        try:
            view = await self.plane.deployment(live.name)
        except ServiceError as exc:
            log.warning("cannot read %s from broadcast: %s", live.name, exc)
            return None
        if view is None:
            return None
        return Route(live.name, view["active_version"], view["entry"]["url"], view["entry"]["stage_id"],
                     {s["node_id"]: s["url"] for s in view["stages"]},
                     tuple((s["stage_id"], s["url"]) for s in view["stages"]))  # fmt: skip

    def newer(self, route: Route) -> Route | None:
        """The committed route when it is newer than the session's (RouteProvider)."""
        live = self.live.get(route.deployment)
        if live is None or live.route is None or live.route.version <= route.version:
            return None
        return live.route if live.policy.adaptive else None

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
                fresh = await self._route_from_broadcast(live)
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
            exclude = frozenset({failed_node})
            trigger = f"stage on {failed_node} failed mid-request ({error[:160]})"
            if not await self._evaluate(live, trigger, exclude) and (live.route is None
                                                                     or live.route.version <= route.version):  # fmt: skip
                raise ChainFailure(503, f"could not re-route {route.deployment!r} around {failed_node}")
        log.info("%s: re-routed around %s in %.2fs", route.deployment, failed_node, time.perf_counter() - t0)
        return live.route

    def step_seen(self, deployment: str, version: int, step_s: float) -> None:
        """The gateway reports one decode step as it ends (no I/O: called on the request's path)."""
        live = self.live.get(deployment)
        if live is not None:
            live.steps.append((time.monotonic(), version, step_s))

    def observe(self, deployment: str, failed: bool) -> None:
        """The gateway reports a finished request (its steps came one by one)."""
        live = self.live.get(deployment)
        if live is None:
            return
        live.requests += 1
        live.failed += int(failed)
        attainment = self.measured(deployment).slo_attainment
        if attainment is not None:
            self.metrics.slo_attainment.labels(deployment).set(attainment)

    def measured(self, deployment: str) -> MeasuredView:
        """Median step time on the active version over recent requests."""
        live = self.live.get(deployment)
        if live is None:
            return MeasuredView(step_s=None, steps=0, requests=0, failed_requests=0, slo_attainment=None)
        version = live.route.version if live.route else None
        steps = [s for _, v, s in live.steps if v == version]  # decode steps only (no prefills)
        slo = live.policy.latency_slo_s
        return MeasuredView(
            step_s=statistics.median(steps[-64:]) if steps else None, steps=len(steps),
            requests=live.requests, failed_requests=live.failed,
            slo_attainment=(sum(s <= slo for s in steps[-64:]) / len(steps[-64:])) if slo and steps else None,
        )  # fmt: skip

    def _slo_trigger(self, live: Live) -> str | None:
        m = self.measured(live.name)
        slo = live.policy.latency_slo_s
        if slo and m.step_s is not None and m.steps >= 8 and m.step_s > slo:
            return f"SLO miss: median step {m.step_s * 1000:.0f} ms > {slo * 1000:.0f} ms"
        return None

    async def _record_measured(self, live: Live) -> None:
        """Once a new version has served enough steps, log measured against predicted."""
        if live.route is None or live.route.version in live.measured_versions or live.predicted is None:
            return
        version = live.route.version
        # The first steps on a new version run on freshly loaded weights and
        # overlap the rollout's own work: they say little about the plan.
        steps = [s for _, v, s in live.steps if v == version][MEASURE_SKIP_STEPS:]
        if len(steps) < MEASURE_STEPS:
            return
        live.measured_versions.add(version)
        m_step = statistics.median(steps)
        ratio = m_step / live.predicted.step_s if live.predicted.step_s > 0 else None
        predicted = live.predicted.step_s
        await self._log("measured", live.name,
                        f"v{version}: measured step {m_step * 1000:.1f} ms, predicted {predicted * 1000:.1f} ms",
                        {"version": version, "measured_step_s": m_step, "predicted_step_s": predicted,
                         "ratio": ratio, "steps": len(steps)})  # fmt: skip

    # ----- bookkeeping ---------------------------------------------------------

    async def _set_state(self, live: Live, state: str, reason: str | None) -> None:
        if await run_in_threadpool(self.store.set_state, live.name, state, reason):
            log.info("%s is %s%s", live.name, state, f": {reason}" if reason else "")
            await self._log("state", live.name, f"{state}{f': {reason}' if reason else ''}", {"state": state})

    async def _log(self, kind: str, deployment: str | None, message: str, data: dict) -> None:
        event = await run_in_threadpool(self.store.add_event, kind, deployment, message, data, time.time())
        if self.publisher is not None:
            await self.publisher.publish(bus.ORCHESTRATOR_EVENTS, event.model_dump())
