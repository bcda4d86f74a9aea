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
import dataclasses
import logging
import statistics
import time

from starlette.concurrency import run_in_threadpool

from edgeorch.orchestration.clients import ControlPlane, ServiceError
from edgeorch.orchestration.decide import (
    Decision,
    decide,
    measured_slowdown,
    quality_loss,
    reformat_candidate,
    unverified_hops,
)
from edgeorch.orchestration.generation import Route
from edgeorch.orchestration.snapshot import (
    NoNodesError,
    cluster_from_monitor,
    move_basis,
    objective_value,
    plan_request,
    predict,
    restricted,
    with_formats,
)
from edgeorch.rollout.plan import place
from edgeorch.rollout.signing import resolve_secret
from edgeorch.schemas.orchestrator import PredictedView
from edgeorch.schemas.plan import PlanResponse, PlanStage
from edgeorch.schemas.rollout import Plan
from edgeorch.service import bus
from services.orchestrator.live import Live, measured
from services.orchestrator.routing import Routes
from services.orchestrator.store import OrchestratorStore

log = logging.getLogger(__name__)

MEASURE_SKIP_STEPS = 16  # steps on a new version before its measurement starts
MEASURE_STEPS = 32  # steps that make one measurement
URGENT_POLL_S = 0.1  # how often the pause between two looks checks whether it should end early


class Controller:
    """Deployments in memory and the control loop per deployment; ``routes`` serves the gateway."""

    def __init__(self, store: OrchestratorStore, plane: ControlPlane, settings, metrics, publisher=None):
        self.store = store
        self.publisher = publisher
        self.plane = plane
        self.settings = settings
        self.metrics = metrics
        self.live: dict[str, Live] = {}
        self.routes = Routes(self.live, store, plane, self._evaluate, metrics,
                             secret=resolve_secret(getattr(settings, "rollout_secret", "")))  # fmt: skip
        self.routes.log_event = self._log

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
        self.routes.suspects.pop(node_id, None)

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
        current = list(active.stages) if active else None
        t_plan = time.perf_counter()
        try:
            nodes, links = await asyncio.gather(self.plane.nodes(live.profile_key), self.plane.links())
            if active is None:
                await self.plane.request_profile(live.profile_key)
            cluster = cluster_from_monitor(nodes, links, live.policy.nodes, self.routes.excluded(exclude),
                                           live.profile_key, keep={s.node for s in current or ()})  # fmt: skip
            provisional = {(lk.src, lk.dst) for lk in links if lk.provisional}
            del nodes, links  # a 1,000-node fleet's views: not kept through the splitter's answer
            req = plan_request(live.profile, cluster, live.policy, current, self.settings.plan_time_limit_s)
            answer = await self.plane.plan(req)
            plan_s = time.perf_counter() - t_plan  # measurements and the splitter's answer
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
        prefill = cluster.prefill_flops_per_s
        # Both plans are judged on their own nodes' figures (snapshot.restricted), not the fleet's.
        req = restricted(req, {s.node for s in (*(current or ()), *answer.stages)})
        cluster = dataclasses.replace(cluster, nodes=req.nodes, links=req.links)
        cur_pred = predict(req, current, prefill) if current else None
        live.predicted = cur_pred or live.predicted
        # The splitter places units; the format of each hop is chosen here, from its link.
        stages = with_formats(req, answer.stages, live.policy, prefill) or answer.stages
        cand_pred = predict(req, stages, prefill)
        if active is None:
            return await self._roll_out(live, "deploy", f"{trigger}: first plan", stages, cluster.urls,
                                        cand_pred, answer, plan_s)  # fmt: skip
        revision_kind, current_feasible = (answer.revision.kind, answer.revision.current_feasible) \
            if answer.revision else ("resplit", cur_pred is not None)  # fmt: skip
        slowed = self._slowed(live)
        last_change_at = (await run_in_threadpool(self.store.get, live.name)).last_change_at
        decision = decide(revision_kind=revision_kind, current_feasible=current_feasible,
                          current=cur_pred, candidate=cand_pred, policy=live.policy, now=time.time(),
                          last_change_at=last_change_at, trigger=trigger, slowed=slowed)  # fmt: skip
        # A move onto links the monitor has not re-measured since they may have changed waits for
        # fresh figures (decide.unverified_hops); the reformat below may still be taken meanwhile.
        stale = unverified_hops(current, stages, provisional) \
            if decision.change and current_feasible and not exclude and live.policy.adaptive else []  # fmt: skip
        if stale:
            live.pending = None  # the gain must be seen again on fresh figures
            asyncio.get_running_loop().call_later(self.settings.confirm_s, self.poke, live.name,
                                                  "links re-measured?")  # fmt: skip
            decision = Decision(decision.kind, False, f"{decision.reason}; waiting for fresh figures of "
                                f"{', '.join(f'{a}->{b}' for a, b in stale)} (provisional at the monitor)",
                                decision.gain)  # fmt: skip
        # The same stages with each hop's format chosen anew: taken when it predicts at least as
        # well as the splitter's candidate, or when that candidate does not pass (a format change
        # has its own, smaller threshold: no weights move).
        reformat = reformat_candidate(req, current, live.policy, "keep", None, prefill) \
            if current_feasible and current else None  # fmt: skip
        if reformat is not None:
            r_stages, r_pred = reformat
            better = objective_value(r_pred, live.policy.objective) <= objective_value(
                cand_pred, live.policy.objective
            )
            if revision_kind == "keep" or not decision.change or better:
                r_decision = decide(revision_kind="reformat", current_feasible=True, current=cur_pred,
                                    candidate=r_pred, policy=live.policy, now=time.time(),
                                    last_change_at=last_change_at, trigger=trigger, slowed=slowed,
                                    less_lossy=quality_loss(r_stages) < quality_loss(current))  # fmt: skip
                if r_decision.change or better:
                    stages, cand_pred, decision = r_stages, r_pred, r_decision
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
        if current_feasible and not exclude and live.policy.adaptive:
            confirmation = self._confirmation(live, slowed)
            if confirmation is None:
                await self._log("keep", live.name, f"{decision.reason}; waiting {self.settings.confirm_s:.1f}s "
                                "to see the gain again", {"candidate_stages": [[s.node, s.start, s.end] for s in stages]})  # fmt: skip
                return False
            reason = f"{reason}; {confirmation}"
        kind = "recover" if exclude else decision.kind
        # Sessions moved by this change are priced on this look's figures (migrate or replay).
        live.move_basis = move_basis(req, prefill, {s.node for s in (*current, *stages)})
        return await self._roll_out(live, kind, reason, stages, cluster.urls, cand_pred, answer, plan_s)

    def _confirmation(self, live: Live, slowed: float | None) -> str | None:
        """What confirms a voluntary change now, or None (then a look ``confirm_s`` later may).

        Speeds measured on a busy shared host swing for a second or two, and
        the swing alone predicts gains for plans that only shuffle nodes,
        while a real change (a slower node) keeps predicting its gain (figures:
        docs/design.md, "As built: the orchestrator", Deciding). So a gain
        must be predicted on every look for ``confirm_s`` — unless the
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

    async def _roll_out(self, live: Live, kind: str, reason: str, stages: list[PlanStage],
                        urls: dict[str, str], predicted: PredictedView | None, answer: PlanResponse,
                        plan_s: float | None = None) -> bool:  # fmt: skip
        """Hand a plan to broadcast, wait for COMMIT, record it; True when committed.

        The event's data say where the time went: ``plan_s`` (measurements and
        the splitter), ``prepare_s`` (created until every worker acked: their
        loads), each worker's own ``load_s`` as it acked, ``commit_s``.
        """
        # The splitter's stages with the URL each node was reached at: what broadcast loads and the history keeps.
        stages = [PlanStage(node=s.node, start=s.start, end=s.end, url=urls[s.node],
                            activation_format=s.activation_format) for s in stages]  # fmt: skip
        plan = Plan(model=live.model, format=live.policy.weight_format, stages=stages)
        t0 = time.time()
        try:
            rollout = await self.plane.start_rollout(live.name, plan, self.settings.rollout_wait_s)
            live.pending = None
        except ServiceError as exc:
            body = [s.model_dump() for s in stages]
            await self._log("rollout_refused", live.name, f"{kind} refused: {exc}", {"stages": body})
            return False
        version = rollout.version
        await run_in_threadpool(self.store.add_plan, live.name, version, kind, reason, stages, predicted,
                                answer.migration_bytes, t0)  # fmt: skip
        log.info("%s v%d (%s): %s -> %s", live.name, version, kind, reason, " | ".join(
            f"{s.node}[{s.start},{s.end})" + (f" >{s.activation_format}" if s.activation_format != "fp32" else "")
            for s in stages))  # fmt: skip
        try:
            view = await self.plane.wait_rollout(rollout.id, self.settings.rollout_wait_s)
            phase, why = view.phase, view.reason
            phases = {"prepare_s": view.prepare_s, "commit_s": view.commit_s,
                      "load_s": {a.node_id: round(a.prepare_s, 3) for a in view.acks}}  # fmt: skip
        except ServiceError as exc:
            phase, why, phases = "unknown", str(exc), {}
        committed = phase in ("committed", "completed")
        await run_in_threadpool(self.store.finish_plan, live.name, version, committed, time.time(), True)
        data = {"version": version, "stages": [s.model_dump() for s in stages], "rollout_id": rollout.id,
                "predicted": predicted.model_dump() if predicted else None, "took_s": time.time() - t0,
                "migration_bytes": answer.migration_bytes, "solver": answer.solver.name, "plan_s": plan_s,
                **phases}  # fmt: skip
        if not committed:
            await self._log("rollout_aborted", live.name, f"{kind} v{version} aborted: {why}", data)
            return False
        self.metrics.replans.labels(kind).inc()
        await self._log(kind, live.name, f"v{version} committed: {reason}", data)
        live.route = Route(live.name, version, tuple(place(live.name, version, plan)), self.routes.secret)
        live.predicted = predicted
        await self._set_state(live, "ready", None)
        return True

    def _slo_trigger(self, live: Live) -> str | None:
        m = measured(live)
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
        steps = [s for _, v, s, *_ in live.steps if v == version][MEASURE_SKIP_STEPS:]
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
