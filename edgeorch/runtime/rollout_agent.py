"""A worker's side of the Reconfiguration Broadcast: converge on the desired state, ack PREPAREs.

Two inputs, one action. Signed notifications arrive on Redis
(``bus.ROLLOUTS``); the agent verifies each and, if it passes, wakes its
reconcile loop. The loop also runs at start and every ``pull_interval_s``.
Reconciling pulls this node's signed desired state from the broadcast
service, loads the stages it lacks (sharing units already held), warms them,
unloads stages of versions no longer wanted, and acks any PREPARE it was
asked for. So a worker that missed messages, restarted, or was cut off from
Redis converges on its own, and a forged message can at most be logged.

Neither loop ever ends on an error: each logs, backs off, and keeps going.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter

from edgeorch.rollout.plan import parse_stage_id
from edgeorch.rollout.signing import SIGNATURE_HEADER, MessageVerifier, addressed_to, sign_bytes
from edgeorch.runtime.host import StageHost
from edgeorch.runtime.standby import keep_standby
from edgeorch.schemas.stage import StageSpec
from edgeorch.security.certs import client_verify
from edgeorch.security.credentials import stage_credential
from edgeorch.service import bus

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
MAX_MESSAGE_BYTES = 64 << 10  # a notification is a few hundred bytes; anything huge is not ours


@dataclass
class RolloutAgentConfig:
    """Where the broadcast service and Redis are, the shared secret, and the pull period."""

    node_id: str
    broadcast_url: str
    redis_url: str
    secret: str
    pull_interval_s: float = 5.0
    max_age_s: float = 300.0
    standby: bool = False  # keep every unit of the served models warm (edgeorch.runtime.standby)


@dataclass
class _Prepared:
    seconds: float = 0.0
    bytes_read: int = 0
    error: str | None = None


class RolloutAgent:
    """Keeps a worker's stages equal to what the broadcast service wants of it."""

    def __init__(self, host: StageHost, cfg: RolloutAgentConfig, registry: CollectorRegistry):
        self.host = host
        self.cfg = cfg
        self.verifier = MessageVerifier(cfg.secret, max_age_s=cfg.max_age_s)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._http: httpx.AsyncClient | None = None
        self._prepared: dict[tuple[str, int], _Prepared] = {}
        self._acked: set[str] = set()
        self.messages = Counter(
            "edgeorch_worker_rollout_messages", "Rollout notifications by result (accepted, not_addressed: about other nodes only, or why rejected)",
            ["result"], registry=registry,
        )  # fmt: skip
        self.reconciles = Counter(
            "edgeorch_worker_rollout_reconciles",
            "Desired-state pulls by result",
            ["result"],
            registry=registry,
        )

    async def start(self) -> None:
        """Start the reconcile and subscribe loops (the first pull happens right away)."""
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=3.0), verify=client_verify())
        self._tasks = [
            asyncio.create_task(self._reconcile_loop(), name="rollout-reconcile"),
            asyncio.create_task(self._subscribe_loop(), name="rollout-subscribe"),
            asyncio.create_task(asyncio.to_thread(_import_model_code), name="rollout-imports"),
        ]

    async def stop(self) -> None:
        """Stop both loops."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._http is not None:
            await self._http.aclose()

    # ----- notifications ---------------------------------------------------

    def on_message(self, data: bytes | str) -> bool:
        """Verify one notification; wake the reconcile loop if it passes. True when accepted."""
        msg: Any = None
        if len(data) <= MAX_MESSAGE_BYTES:
            try:
                msg = json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                pass
        reason = self.verifier.check_message(msg)
        summary = _summary(msg)
        if reason is not None:
            self.messages.labels(reason.split(":")[0]).inc()
            log.warning("rejected rollout message %s: %s", summary, reason)
            return False
        if not addressed_to(msg, self.cfg.node_id):
            self.messages.labels("not_addressed").inc()
            log.debug("rollout message %s accepted; not about this node", summary)
            return True
        self.messages.labels("accepted").inc()
        log.info("rollout message %s accepted; reconciling", summary)
        self._wake.set()
        return True

    async def _subscribe_loop(self) -> None:
        # Anything published while we were not listening is in the pull: reconcile on (re)subscribing.
        await bus.follow(self.cfg.redis_url, bus.ROLLOUTS, self.on_message, on_subscribed=self._wake.set,
                         max_backoff_s=MAX_BACKOFF_S)  # fmt: skip

    # ----- reconcile -------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        failures = 0
        while True:
            self._wake.clear()  # a message arriving during the reconcile wakes the next one
            try:
                ok = await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("rollout reconcile failed")
                ok = False
            failures = 0 if ok else failures + 1
            delay = self.cfg.pull_interval_s
            if failures:
                delay = min(self.cfg.pull_interval_s * 2 ** (failures - 1), max(MAX_BACKOFF_S, delay))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def reconcile(self) -> bool:
        """Pull, verify and apply the desired state once; False when it could not be pulled or trusted."""
        doc = await self._pull()
        if doc is None:
            self.reconciles.labels("unreachable").inc()
            return False
        reason = self.verifier.check_desired(doc, self.cfg.node_id)
        if reason is not None:
            self.reconciles.labels("rejected").inc()
            log.warning("rejected desired state from %s: %s", self.cfg.broadcast_url, reason)
            return False
        entries, stale = self.verifier.fresh_entries(doc)
        if stale:
            log.warning(
                "desired state is older than one already applied for %s; left as is", ", ".join(stale)
            )
        wanted = {s["stage_id"]: (e["name"], s) for e in entries for s in e["stages"]}
        await self._load_missing(wanted)
        # Ack before unloading what is no longer wanted: an ack needs only the wanted
        # stages, and freeing old ones (unmapping, trimming malloc) took seconds on a
        # busy machine, which a recovery's rollout waited out.
        await self._send_acks(entries)
        self._unload_unwanted(wanted, {e["name"] for e in entries})
        if self.cfg.standby:
            try:
                await keep_standby(
                    self.host, {(s["model"], s.get("format", "fp32")) for _, s in wanted.values()}
                )
            except Exception:  # only a head start for a later recovery; loads still work without it
                log.exception("could not keep the standby units")
        kept = {(name, s["version"]) for name, s in wanted.values()}
        self._prepared = {k: v for k, v in self._prepared.items() if k in kept}
        self.reconciles.labels("ok").inc()
        return True

    async def _pull(self) -> dict | None:
        url = f"{self.cfg.broadcast_url}/v1/nodes/{self.cfg.node_id}/desired"
        try:
            resp = await self._http.get(url)
        except httpx.HTTPError as exc:
            log.warning("desired state unreachable at %s: %r", url, exc)
            return None
        if resp.status_code != 200:
            log.warning("desired state at %s answered %d: %s", url, resp.status_code, resp.text[:300])
            return None
        try:
            return resp.json()
        except json.JSONDecodeError:
            log.warning("desired state at %s is not JSON", url)
            return None

    async def _load_missing(self, wanted: dict[str, tuple[str, dict]]) -> None:
        """Load and warm every wanted stage not loaded yet, accounting time and bytes per version."""
        for sid, (name, s) in wanted.items():
            if sid in self.host.stages:
                continue
            key = (name, s["version"])
            prepared = self._prepared.setdefault(key, _Prepared())
            t0 = time.perf_counter()
            try:
                # Credentials derive from the rollout secret and the stage ids (edgeorch.security).
                nxt = s["next"] and {
                    **s["next"],
                    "credential": stage_credential(self.cfg.secret, s["next"]["stage_id"]),
                }
                spec = StageSpec(
                    model=s["model"],
                    start=s["start"],
                    end=s["end"],
                    next=nxt,
                    format=s.get("format", "fp32"),  # absent: a broadcast from before formats
                    activation_format=s.get(
                        "activation_format", "fp32"
                    ),  # chosen per link by the orchestrator
                    credential=stage_credential(self.cfg.secret, sid),
                )
                info, _ = await self.host.load(sid, spec)
                await self.host.warm(sid)
            except Exception as exc:  # a stage that cannot load fails the prepare, not the worker
                prepared.error = f"{sid}: {type(exc).__name__}: {exc}"
                log.warning("could not prepare stage %s: %s", sid, prepared.error)
                continue
            prepared.seconds += time.perf_counter() - t0
            prepared.bytes_read += info.bytes_read
            log.info("prepared stage %s of %s v%d: %d bytes read, %d units shared, %.2fs",
                     sid, name, s["version"], info.bytes_read, info.units_shared,
                     time.perf_counter() - t0)  # fmt: skip

    def _unload_unwanted(self, wanted: dict[str, tuple[str, dict]], managed: set[str]) -> None:
        """Unload versioned stages of deployments the broadcast manages that are no longer wanted.

        Runs after loading, so units shared with a wanted stage are kept, not reloaded.
        """
        for sid in list(self.host.stages):
            ref = parse_stage_id(sid)
            if ref is None or ref.deployment not in managed or sid in wanted:
                continue
            try:
                self.host.unload(sid)
                log.info(
                    "released stage %s (v%d of %s is no longer wanted)", sid, ref.version, ref.deployment
                )
            except LookupError:
                pass  # unloaded by someone else meanwhile

    async def _send_acks(self, entries: list[dict]) -> None:
        for e in entries:
            prep = e.get("prepare")
            if not prep or prep["rollout_id"] in self._acked:
                continue
            version = prep["version"]
            mine = [s["stage_id"] for s in e["stages"] if s["version"] == version]
            done = self._prepared.get((e["name"], version), _Prepared())
            missing = [sid for sid in mine if sid not in self.host.stages]
            error = done.error or (f"stages not loaded: {missing}" if missing else None)
            ack = {"rollout_id": prep["rollout_id"], "node_id": self.cfg.node_id, "ok": error is None,
                   "prepare_s": done.seconds, "bytes_read": done.bytes_read, "error": error}  # fmt: skip
            if await self._post_ack(ack):
                self._acked.add(prep["rollout_id"])

    async def _post_ack(self, ack: dict) -> bool:
        """POST a signed ack; True when the broadcast service has it (or no longer wants it)."""
        body = json.dumps(ack).encode()
        url = f"{self.cfg.broadcast_url}/v1/rollouts/{ack['rollout_id']}/acks"
        headers = {"content-type": "application/json", SIGNATURE_HEADER: sign_bytes(body, self.cfg.secret)}
        try:
            resp = await self._http.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            log.warning("ack of rollout %s not delivered (%r); will retry", ack["rollout_id"], exc)
            return False
        if resp.status_code == 200:
            log.info("acked rollout %s: ok=%s in %.2fs, %d bytes read", ack["rollout_id"], ack["ok"],
                     ack["prepare_s"], ack["bytes_read"])  # fmt: skip
            return True
        log.warning("ack of rollout %s answered %d: %s", ack["rollout_id"], resp.status_code, resp.text[:300])
        return resp.status_code in (404, 409)  # the rollout is gone or past PREPARE: nothing to retry


def _import_model_code() -> None:
    """Import every model family's code now: seconds of CPU a first PREPARE would otherwise pay."""
    t0 = time.perf_counter()
    try:
        from edgeorch.models import bert, gpt2, llama  # noqa: F401
    except Exception:  # only an optimisation; the load itself will report a real problem
        log.exception("could not import model code ahead of time")
        return
    log.info("model code imported ahead of rollouts in %.1fs", time.perf_counter() - t0)


def _summary(msg: Any) -> str:
    if not isinstance(msg, dict):
        return "(unparseable)"
    return f"{msg.get('kind')} {msg.get('deployment')} v{msg.get('version')} rollout {msg.get('rollout_id')}"
