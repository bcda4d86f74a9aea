"""Spot checks of stages on untrusted nodes: recompute a share of steps on a trusted node and compare.

A chain's intermediate activations never reach the gateway, so a step is
checked by its *answer*: for a sampled decode step of a route with a stage
on an untrusted node, the gateway (off the request's path) sends the tokens
that step consumed as one prefill of a fresh session, asking for the
sampled token's log-probability and its ``TOP`` likeliest alternatives, to

- the route itself (the untrusted stages included), and
- a *shadow*: one stage holding every unit of the model on a trusted node,
  loaded there on demand by the gateway and kept warm while the deployment
  has untrusted stages (:class:`Shadows`).

Both compute the same layers on the same tokens in the same order (a prefill
is never batched with other sessions), so with float32 weights and float32
hops the log-probabilities are equal bit for bit; with a lossy format
anywhere on the route they are compared within ``tolerance`` (nats, the
largest difference over the top log-probabilities). A difference, or a
different token, blames the route's untrusted nodes.

What it does not catch (docs/design.md, "Spot checks"): a node that tells
check prefills from real ones (a fresh session whose prompt is a session's
prefix) and computes honestly only then; tampering that only touches decode
steps; answers that completed before a check found the node out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import torch

from edgeorch.runtime.logprobs import TOKEN_LOGPROB, TOP_IDS, TOP_LOGPROBS
from edgeorch.schemas.monitor import NodeView
from edgeorch.schemas.rollout import PlacedStage
from edgeorch.schemas.stage import Sampling
from edgeorch.security.credentials import credential_headers, new_credential
from edgeorch.transport import protocol, wire
from edgeorch.transport.hopclient import HopClient, HopError

log = logging.getLogger(__name__)

TOP = 5  # alternatives compared besides the token's own log-probability
DEFAULT_SHARE = 0.02
DEFAULT_TOLERANCE = 0.05  # nats, for routes with a lossy weight format
MAX_CHECK_TOKENS = 1024  # longer prefixes are not checked (the shadow plans this much context)


@dataclass(frozen=True)
class Verdict:
    """One check: whether the route's answer equalled the shadow's, and what differed."""

    ok: bool
    deployment: str
    version: int
    nodes: tuple[str, ...]  # the route's untrusted nodes (blamed when not ok)
    tokens: int
    detail: str
    seconds: float
    max_diff: float | None  # None: not comparable (another token, other top tokens)
    started_at: float = 0.0  # monotonic: what the route computed from then on is covered by a pass


@dataclass
class Answer:
    """What a chain answered to a check prefill: the token and its log-probabilities."""

    token: int
    token_logprob: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor


def compare(route_answer: Answer, shadow: Answer, tolerance: float) -> tuple[bool, float | None, str]:
    """(equal within ``tolerance``, largest log-probability difference (None: other tokens), what differed)."""
    if route_answer.token != shadow.token:
        return False, None, f"token {route_answer.token} where the trusted node computed {shadow.token}"
    if not torch.equal(route_answer.top_ids, shadow.top_ids):
        top = route_answer.top_ids.tolist()
        return False, None, f"top tokens {top} where the trusted node computed {shadow.top_ids.tolist()}"
    a = torch.cat([route_answer.token_logprob, route_answer.top_logprobs]).double()
    b = torch.cat([shadow.token_logprob, shadow.top_logprobs]).double()
    diff = float((a - b).abs().max())
    if tolerance == 0.0:
        if torch.equal(a, b):
            return True, 0.0, "bit-exact"
        return False, diff, f"log-probabilities differ by up to {diff:.3g} (fp32: must be bit-exact)"
    if diff <= tolerance:
        return True, diff, f"within {tolerance:g} nats ({diff:.3g})"
    return False, diff, f"log-probabilities differ by up to {diff:.3g} nats (tolerance {tolerance:g})"


def check_body(tokens: list[int]) -> tuple[str, bytes]:
    """A check prefill: a fresh session, greedy, released at once, with log-probabilities."""
    session = uuid.uuid4().hex
    body = protocol.step_body({"x": torch.tensor([tokens], dtype=torch.int64)}, session=session, position=0,
                              mode="generate", sampling=Sampling().model_dump(), release=True,
                              logprobs={"top": TOP})  # fmt: skip
    return session, body


async def ask(http: HopClient, url: str, stage_id: str, headers: dict[str, str], tokens: list[int],
              timeout_s: float) -> Answer:  # fmt: skip
    """Send a check prefill to a chain's entry; its answer (HopFailure / HopError on failure)."""
    _, body = check_body(tokens)
    resp = await http.post(protocol.forward_url(url, stage_id), content=body,
                           headers={**protocol.FRAME_HEADERS, **headers}, timeout_s=timeout_s)  # fmt: skip
    frame: wire.Frame
    frame, _ = protocol.read_answer(resp, stage_id)
    t = frame.tensors
    return Answer(int(frame.meta["token"]), t[TOKEN_LOGPROB], t[TOP_IDS], t[TOP_LOGPROBS])


@dataclass
class Shadow:
    """A whole-model stage on a trusted node that checks are recomputed on."""

    node: str
    url: str
    stage_id: str
    credential: str = field(repr=False)
    model: str
    format: str


Blame = Callable[[Verdict], Awaitable[None]]


class SpotChecker:
    """Decides which steps to check (``share`` of them), runs the checks in the background, reports.

    ``shadows`` (:class:`Shadows`) says which nodes are untrusted and finds or
    loads the trusted recomputation; ``blame`` hears every failed check.
    """

    def __init__(self, http: HopClient, shadows: Shadows, blame: Blame,
                 share: float = DEFAULT_SHARE, tolerance: float = DEFAULT_TOLERANCE, max_in_flight: int = 2,
                 timeout_s: float = 60.0, seed: int | None = None, settle_max_s: float = 0.0):  # fmt: skip
        self.http = http
        self.shadows = shadows
        self.blame = blame
        self.share = share
        self.tolerance = tolerance
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self._rng = random.Random(seed)
        self._tasks: set[asyncio.Task] = set()
        self.counts = {"sampled": 0, "checked": 0, "passed": 0, "failed": 0, "skipped": 0}
        self.verdicts: list[Verdict] = []  # the most recent ones, newest last
        self.max_verdicts = 200
        self.settle_max_s = settle_max_s
        self.passed_at: dict[str, float] = {}  # node -> start (monotonic) of its latest passed check
        self.failed_nodes: set[str] = set()  # nodes a check blamed (until an operator trusts them again)
        self._news = asyncio.Condition()
        self._no_shadow_until = 0.0  # no shadow could be had lately: answers are not held for nothing

    def route_nodes(self, stages: tuple[PlacedStage, ...]) -> tuple[str, ...]:
        """The untrusted nodes of a route, in stage order, once each."""
        return tuple(dict.fromkeys(s.node for s in stages if self.shadows.untrusted(s.node)))

    def after_step(self, deployment: str, version: int, stages: tuple[PlacedStage, ...], headers: dict[str, str],
                   tokens: list[int]) -> bool:  # fmt: skip
        """Called after every decode step (no I/O): maybe start a check of it; True when one started.

        ``tokens``: what the step consumed, from the prompt's first token on; ``headers``: the
        entry stage's credential.
        """
        if self.share <= 0 or not stages or self._rng.random() >= self.share:
            return False
        nodes = self.route_nodes(stages)
        if not nodes:
            return False
        self.counts["sampled"] += 1
        if len(self._tasks) >= self.max_in_flight or len(tokens) > MAX_CHECK_TOKENS:
            self.counts["skipped"] += 1  # checks must not pile up behind a slow shadow
            return False
        coro = self._check(deployment, version, stages, headers, list(tokens), nodes)
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _check(self, deployment: str, version: int, stages: tuple[PlacedStage, ...], headers: dict[str, str],
                     tokens: list[int], nodes: tuple[str, ...]) -> None:  # fmt: skip
        try:
            verdict = await self.check(deployment, version, stages, headers, tokens, nodes)
        except Exception:  # noqa: BLE001 - a check that cannot run blames nobody
            log.exception("spot check of %s v%d could not run", deployment, version)
            self.counts["skipped"] += 1
            return
        if verdict is None:
            self.counts["skipped"] += 1
            return
        await self._record(verdict)

    async def _record(self, verdict: Verdict) -> None:
        self.counts["checked"] += 1
        self.counts["passed" if verdict.ok else "failed"] += 1
        self.verdicts = [*self.verdicts[-(self.max_verdicts - 1) :], verdict]
        if verdict.ok:
            for node in verdict.nodes:
                self.passed_at[node] = max(self.passed_at.get(node, 0.0), verdict.started_at)
        else:
            self.failed_nodes.update(verdict.nodes)
            log.warning("spot check FAILED on %s v%d (nodes %s): %s", verdict.deployment, verdict.version,
                        verdict.nodes, verdict.detail)  # fmt: skip
            await self.blame(verdict)
        async with self._news:
            self._news.notify_all()

    async def settle(self, deployment: str, version: int, stages: tuple[PlacedStage, ...], headers: dict[str, str],
                     tokens: list[int], since: float) -> None:  # fmt: skip
        """Wait until every untrusted node of ``stages`` passed a check that started after ``since``.

        A whole answer is held here before it is given out, so that one computed
        by a node that is then found out is generated again instead
        (``RouteProvider.tainted``). Steady load brings a sampled check soon; when
        none has passed within ``settle_max_s``, this answer's own last step is
        checked (a forced check, counted as ``forced``). Returns after a failed
        check of one of its nodes too: the caller asks whether they are tainted.
        Returns at once when holding is off (``settle_max_s`` 0) or no shadow
        could be had lately.
        """
        nodes = self.route_nodes(stages)
        if not nodes or self.share <= 0 or self.settle_max_s <= 0 or time.monotonic() < self._no_shadow_until:
            return

        def settled() -> bool:
            return all(self.passed_at.get(n, 0.0) >= since for n in nodes) or bool(
                self.failed_nodes & set(nodes)
            )

        async with self._news:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._news.wait_for(settled), self.settle_max_s)
        if settled():
            return
        self.counts["forced"] = self.counts.get("forced", 0) + 1
        verdict = await self.check(deployment, version, stages, headers, list(tokens), nodes)
        if verdict is not None:
            await self._record(verdict)

    async def check(self, deployment: str, version: int, stages: tuple[PlacedStage, ...], headers: dict[str, str],
                    tokens: list[int], nodes: tuple[str, ...]) -> Verdict | None:  # fmt: skip
        """Recompute ``tokens`` on the route and on the shadow and compare; None when no shadow can run it."""
        t0, started = time.perf_counter(), time.monotonic()
        formats = {s.format for s in stages}
        fmt = formats.pop() if len(formats) == 1 else "fp32"
        num_units = max(s.end for s in stages)
        await self.shadows.refresh(stages[0].model)
        nodes = self.route_nodes(stages)  # as the monitor says now
        if not nodes:
            return None
        shadow = await self.shadows.get(deployment, stages[0].model, fmt, num_units)
        if shadow is None:
            self._no_shadow_until = time.monotonic() + RETRY_LOAD_S
            return None
        tolerance = 0.0 if fmt == "fp32" and not formats else self.tolerance
        entry = stages[0]
        try:
            route_answer, shadow_answer = await asyncio.gather(
                ask(self.http, entry.url, entry.stage_id, headers, tokens, self.timeout_s),
                ask(self.http, shadow.url, shadow.stage_id, credential_headers(shadow.credential), tokens,
                    self.timeout_s),
            )  # fmt: skip
        except (HopError, protocol.HopFailure) as exc:
            # A route that fails is the gateway's business (it re-routes); a shadow that fails is ours.
            log.info("spot check of %s v%d not compared: %s", deployment, version, exc)
            return None
        ok, diff, detail = compare(route_answer, shadow_answer, tolerance)
        return Verdict(
            ok, deployment, version, nodes, len(tokens), detail, time.perf_counter() - t0, diff, started
        )

    async def aclose(self) -> None:
        """Cancel checks in flight."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def shadow_stage_id(deployment: str) -> str:
    """The shadow's stage id: not a versioned id, so no rollout agent unloads it."""
    return f"{deployment}.shadow"


def shadow_spec(model: str, fmt: str, num_units: int, credential: str) -> dict:
    """The stage spec a shadow is loaded with (one session, enough context for any check)."""
    return {"model": model, "start": 0, "end": num_units, "next": None, "format": fmt, "kv_sessions": 1,
            "kv_context": MAX_CHECK_TOKENS, "credential": credential}  # fmt: skip


def new_shadow(node: str, url: str, deployment: str, model: str, fmt: str) -> Shadow:
    """A shadow to load on ``node`` (its credential made here: nobody else calls it)."""
    return Shadow(node, url.rstrip("/"), shadow_stage_id(deployment), new_credential(), model, fmt)


RETRY_LOAD_S = 30.0  # after a shadow could not be loaded anywhere, try again this much later
TRUST_REFRESH_S = 5.0  # what the monitor says of the nodes' trust is read at most this often


class Shadows:
    """Finds or loads each deployment's shadow on a trusted node, and keeps the nodes' trust (a ShadowSource).

    ``nodes(model)``: the monitor's node views; ``http``: a client with the
    workers' admin token (loading a stage is an admin call).
    """

    def __init__(self, http: httpx.AsyncClient, nodes: Callable[[str], Awaitable[list[NodeView]]]):
        self.http = http
        self.nodes = nodes
        self.trusted: dict[str, bool] = {}  # node -> trusted, as the monitor last said
        self.views: list[NodeView] = []
        self._refreshed_at = -TRUST_REFRESH_S
        self.loaded: dict[str, Shadow] = {}  # deployment -> its shadow
        self._failed_at: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def untrusted(self, node: str) -> bool:
        """Whether ``node`` is checked (unknown nodes are, until the monitor says otherwise)."""
        return not self.trusted.get(node, False)

    async def refresh(self, model: str, force: bool = False) -> None:
        """Read the nodes (and their trust) from the monitor, unless that was done lately."""
        if force or time.monotonic() - self._refreshed_at >= TRUST_REFRESH_S:
            self.views = await self.nodes(model)
            self.trusted = {v.node_id: v.trusted for v in self.views}
            self._refreshed_at = time.monotonic()

    async def get(self, deployment: str, model: str, fmt: str, num_units: int) -> Shadow | None:
        """The deployment's shadow on a live trusted node, loaded there first if need be; None: none can."""
        lock = self._locks.setdefault(deployment, asyncio.Lock())
        async with lock:
            views = self.views
            alive = {v.node_id for v in views if v.state == "alive" and v.trusted}
            shadow = self.loaded.get(deployment)
            if shadow is not None and shadow.node in alive and (shadow.model, shadow.format) == (model, fmt):
                return shadow
            if time.monotonic() - self._failed_at.get(deployment, -RETRY_LOAD_S) < RETRY_LOAD_S:
                return None
            # The trusted node with the most memory to spare; a refusal (memory) tries the next.
            for v in sorted((v for v in views if v.node_id in alive), key=lambda v: -v.memory_bytes):
                shadow = new_shadow(v.node_id, v.url, deployment, model, fmt)
                if await self._load(shadow, num_units):
                    self.loaded[deployment] = shadow
                    return shadow
            self._failed_at[deployment] = time.monotonic()
            log.warning("no trusted node could hold a shadow of %s (%s, %d units): spot checks wait",
                        deployment, fmt, num_units)  # fmt: skip
            return None

    async def _load(self, shadow: Shadow, num_units: int) -> bool:
        url = f"{shadow.url}/v1/stages/{shadow.stage_id}"
        try:
            resp = await self.http.put(url, json=shadow_spec(shadow.model, shadow.format, num_units,
                                                             shadow.credential), timeout=300.0)  # fmt: skip
        except httpx.HTTPError as exc:
            log.warning("loading the shadow %s on %s failed: %r", shadow.stage_id, shadow.node, exc)
            return False
        if resp.status_code not in (200, 201):
            log.warning("%s refused the shadow %s: %s %s", shadow.node, shadow.stage_id, resp.status_code,
                        resp.text[:300])  # fmt: skip
            return False
        log.info("shadow %s of %s loaded on trusted node %s", shadow.stage_id, shadow.model, shadow.node)
        return True

    async def drop(self, deployment: str) -> None:
        """Unload a deployment's shadow (best effort)."""
        shadow = self.loaded.pop(deployment, None)
        if shadow is not None:
            with contextlib.suppress(httpx.HTTPError):
                await self.http.delete(f"{shadow.url}/v1/stages/{shadow.stage_id}")
