"""The rollout state machine: allowed transitions, and when PREPARE and drain move on."""

from __future__ import annotations

import itertools

import pytest

from edgeorch.rollout.state import (
    ABORTED,
    COMMITTED,
    COMPLETED,
    PREPARING,
    AckState,
    IllegalTransition,
    check_transition,
    decide_drain,
    decide_prepare,
)

PHASES = [PREPARING, COMMITTED, COMPLETED, ABORTED]
ALLOWED = {(PREPARING, COMMITTED), (PREPARING, ABORTED), (COMMITTED, COMPLETED)}


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(PHASES, PHASES)))
def test_only_the_documented_transitions_are_allowed(src, dst) -> None:
    if (src, dst) in ALLOWED:
        check_transition(src, dst)
    else:
        with pytest.raises(IllegalTransition):
            check_transition(src, dst)


NODES = ["a", "b", "c"]
OK = AckState(True)


@pytest.mark.parametrize(
    ("acks", "dead", "now", "action", "fragment"),
    [
        ({}, {}, 0.0, "wait", "a, b, c"),
        ({"a": OK, "b": OK}, {}, 0.0, "wait", "waiting for c"),
        ({"a": OK, "b": OK, "c": OK}, {}, 0.0, "commit", "all 3"),
        # Every ack in just before the deadline is checked: commit wins.
        ({"a": OK, "b": OK, "c": OK}, {}, 11.0, "commit", "all 3"),
        ({"a": OK, "b": OK}, {}, 10.0, "abort", "prepare timeout from c"),
        (
            {"a": OK, "b": AckState(False, "out of memory")},
            {},
            0.0,
            "abort",
            "b failed to prepare: out of memory",
        ),
        # A failed ack aborts even when every node has answered.
        ({"a": OK, "b": OK, "c": AckState(False)}, {}, 0.0, "abort", "c failed"),
        ({"a": OK}, {"c": "connection refused"}, 0.0, "abort", "c is unreachable"),
        # A node that acked and then stopped answering does not block the commit.
        ({"a": OK, "b": OK, "c": OK}, {"c": "connection refused"}, 0.0, "commit", "all 3"),
    ],
)
def test_prepare_decisions(acks, dead, now, action, fragment) -> None:
    d = decide_prepare(NODES, acks, dead, now, deadline=10.0)
    assert d.action == action
    assert fragment in d.reason


@pytest.mark.parametrize(
    ("now", "has_old", "left", "action", "fragment"),
    [
        (0.5, False, None, "complete", "nothing to drain"),
        (0.5, True, 0, "wait", "grace"),  # nothing seen yet, but a client may be about to start
        (3.0, True, 0, "complete", "drained"),
        (3.0, True, 2, "wait", "2 sessions"),
        (3.0, True, None, "wait", "None sessions"),
        (31.0, True, 2, "complete", "drain timeout after 30s with 2 sessions"),
        (31.0, True, None, "complete", "unknown sessions"),
    ],
)
def test_drain_decisions(now, has_old, left, action, fragment) -> None:
    d = decide_drain(now, committed_at=0.0, grace_s=2.0, timeout_s=30.0, has_old_version=has_old,
                     sessions_left=left)  # fmt: skip
    assert d.action == action
    assert fragment in d.reason
