"""The rollout state machine: which phase follows which, and when to move on.

```
preparing ──all acked──▶ committed ──drained (or drain timeout)──▶ completed
    │
    └──failed ack / dead worker / prepare timeout──▶ aborted
```

The decisions are pure functions of what the broadcast service has observed
(acks, probe failures, session counts, the clock), so they are tested without
processes; the service's driver loop gathers the observations and applies them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PREPARING, COMMITTED, COMPLETED, ABORTED = "preparing", "committed", "completed", "aborted"
TERMINAL = frozenset({COMPLETED, ABORTED})

# Phase order within one version; (version, rank) only grows, which is how a
# worker tells a stale message or desired state from a current one.
PHASE_RANK = {PREPARING: 0, COMMITTED: 1, COMPLETED: 2, ABORTED: 2}
# The message each transition publishes, and its rank.
KIND_OF_PHASE = {PREPARING: "prepare", COMMITTED: "commit", COMPLETED: "release", ABORTED: "abort"}
KIND_RANK = {KIND_OF_PHASE[p]: r for p, r in PHASE_RANK.items()}

_ALLOWED = {PREPARING: {COMMITTED, ABORTED}, COMMITTED: {COMPLETED}, COMPLETED: set(), ABORTED: set()}


class IllegalTransition(ValueError):
    """A phase change the state machine does not allow (e.g. aborting a committed rollout)."""


def check_transition(src: str, dst: str) -> None:
    """Raise unless a rollout may go from ``src`` to ``dst``."""
    if dst not in _ALLOWED.get(src, set()):
        raise IllegalTransition(f"a rollout cannot go from {src!r} to {dst!r}")


@dataclass(frozen=True)
class Decision:
    """What the driver should do with a rollout now, and why."""

    action: Literal["wait", "commit", "abort", "complete"]
    reason: str = ""


@dataclass(frozen=True)
class AckState:
    """A worker's ack as the decision needs it."""

    ok: bool
    error: str | None = None


def decide_prepare(
    nodes: list[str],
    acks: dict[str, AckState],
    dead: dict[str, str],
    now: float,
    deadline: float,
) -> Decision:
    """PREPARE: commit once every node acked ok; abort on a failed ack, a dead node, or the deadline.

    A failure wins over "all acked" only when it concerns a node that has not
    acked ok: a node that acked and then stopped answering probes is not
    probed any more, and its loss is the next plan's problem, not this one's.
    """
    for node in nodes:
        ack = acks.get(node)
        if ack is not None and not ack.ok:
            return Decision("abort", f"node {node} failed to prepare: {ack.error or 'no reason given'}")
    pending = [n for n in nodes if n not in acks]
    for node in pending:
        if node in dead:
            return Decision("abort", f"node {node} is unreachable during prepare: {dead[node]}")
    if not pending:
        return Decision("commit", f"all {len(nodes)} nodes acked")
    if now >= deadline:
        return Decision("abort", f"no ack within the prepare timeout from {', '.join(sorted(pending))}")
    return Decision("wait", f"waiting for {', '.join(sorted(pending))}")


def decide_drain(
    now: float,
    committed_at: float,
    grace_s: float,
    timeout_s: float,
    has_old_version: bool,
    sessions_left: int | None,
) -> Decision:
    """COMMITTED: release the old version once its sessions are gone, or at the drain timeout.

    ``sessions_left`` is None when it has not been measured this round. The
    grace period covers a client that read the old entry stage just before
    the commit and has not sent its first step yet: no cache shows it.
    """
    if not has_old_version:
        return Decision("complete", "first version of the deployment: nothing to drain")
    if now < committed_at + grace_s:
        return Decision("wait", "grace period after commit")
    if sessions_left == 0:
        return Decision("complete", "old version drained")
    if now >= committed_at + timeout_s:
        left = "unknown" if sessions_left is None else str(sessions_left)
        return Decision("complete", f"drain timeout after {timeout_s:.0f}s with {left} sessions left")
    return Decision("wait", f"{sessions_left} sessions left on the old version")
