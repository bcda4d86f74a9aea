"""What moving a live session to a newer plan will cost: its KV over the links, or a replay.

A session that a planned change (remap, re-split, reformat) carries to the
new chain either pulls its KV there (:mod:`edgeorch.orchestration.migration`)
or replays its tokens as one prefill. Neither always wins: on a fast link a
1,500-token context crosses in a fraction of a second while its prefill
takes seconds; on a 5 Mbit/s uplink the same ~11 MB of KV of a 250-token
SmolLM2 session took 15-19 s to cross, against a replay of ~3 s (measured,
docs/design.md "Migrate or replay"). So the gateway asks the cost model
before it moves a session, with the measurements of the look that chose
the new plan.

Pure: numpy and the planning problem, no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgeorch.orchestration.snapshot import stage_formats
from edgeorch.planning.cost import evaluate
from edgeorch.planning.problem import Problem, Stage, Workload
from edgeorch.schemas.plan import PlanStage

# Copying a unit's KV inside one worker (the units that stay on their node):
# a memory copy, charged at a conservative 1 GB/s.
LOCAL_COPY_BYTES_PER_S = 1e9


@dataclass(frozen=True)
class MoveEstimate:
    """The cost model's seconds for both ways of moving one session at ``position`` tokens."""

    position: int
    migrate_s: float  # the moving units' KV over the links (and the rest copied in place)
    replay_s: float  # all ``position`` tokens as one prefill through the new chain
    bytes_remote: int  # KV bytes a migration would send over the network

    @property
    def path(self) -> str:
        """The cheaper path: "migrate" unless a replay is predicted faster."""
        return "replay" if self.replay_s < self.migrate_s else "migrate"

    def describe(self) -> str:
        """One line for logs and events."""
        return (f"migration predicted {self.migrate_s:.2f}s ({self.bytes_remote:,} KV bytes over the network), "
                f"replay {self.replay_s:.2f}s")  # fmt: skip


def estimate_move(
    problem: Problem, old: Sequence[PlanStage], new: Sequence[PlanStage], position: int
) -> MoveEstimate | None:
    """Predicted seconds to migrate or to replay a session of ``position`` tokens from ``old`` to ``new``.

    ``problem``: the look's measurements (node speeds, prefill speeds, link
    bandwidths and RTTs, each unit's KV bytes per token); None when a node
    of either route is not in it (the basis is from before that node joined).

    Migration: each unit of ``new`` that sat on another node in ``old``
    crosses that link (``kv_bytes_per_token`` × ``position``). The pulls run
    concurrently, but everything one node sends shares its uplink, so the
    time is the busiest source's bytes over its links plus one hop's RTT charge; units
    that stay on their node are a memory copy. Replay: the cost model's
    latency of a request whose prompt is the ``position`` tokens, on the new
    chain in its hop formats, prompt at the measured prefill speeds.
    """
    index = {nid: i for i, nid in enumerate(problem.node_ids)}
    if position < 1 or any(s.node not in index for s in (*old, *new)):
        return None
    owner = np.full(problem.num_units, -1, dtype=np.int64)
    for s in old:
        owner[s.start : s.end] = index[s.node]
    kv = problem.kv_bytes_per_token * position
    sent = np.zeros(problem.num_nodes)  # seconds each source node's uplink is busy
    rtt, remote, local = 0.0, 0.0, 0.0
    for s in new:
        dst = index[s.node]
        for unit in range(s.start, s.end):
            src, nbytes = int(owner[unit]), float(kv[unit])
            if nbytes <= 0 or src < 0:
                continue
            if src == dst:
                local += nbytes
                continue
            remote += nbytes
            sent[src] += nbytes / float(problem.bandwidth_bytes_per_s[src, dst])
            rtt = max(rtt, float(problem.rtt_s[src, dst]) / 2)  # what the cost model charges a hop
    migrate_s = float(sent.max(initial=0.0)) + rtt + local / LOCAL_COPY_BYTES_PER_S
    w = problem.workload
    replay = dataclasses.replace(
        problem, workload=Workload(position, 0, 1, max(w.context_tokens, position)), current_stages=None
    )
    stages = [Stage(index[s.node], s.start, s.end) for s in new]
    replay_s = evaluate(replay, stages, stage_formats(new)).latency_s
    return MoveEstimate(position, migrate_s, replay_s, int(remote))
