"""The broadcast store on SQLite: versions only grow, phases follow the state machine, acks are checked."""

from __future__ import annotations

import pytest
from sqlalchemy import text as sql_text

from edgeorch.rollout.plan import desired_for_node
from edgeorch.rollout.state import IllegalTransition
from edgeorch.schemas.rollout import AckRequest, RolloutRequest
from edgeorch.service.storage import make_engine
from services.broadcast.store import Base, Conflict, NotFound, RolloutStore


def _req(version=None, model="tiny-llama", nodes=("a", "b"), supersede_drain=False) -> RolloutRequest:
    stages = [{"node": nodes[0], "url": "http://a:1", "start": 0, "end": 3},
              {"node": nodes[1], "url": "http://b:1", "start": 3, "end": 6}]  # fmt: skip
    return RolloutRequest.model_validate({"deployment": "d", "version": version, "supersede_drain": supersede_drain,
                                          "plan": {"model": model, "stages": stages}})  # fmt: skip


@pytest.fixture
def store(tmp_path) -> RolloutStore:
    engine, sessions = make_engine(f"sqlite:///{tmp_path / 'b.db'}", Base)
    yield RolloutStore(sessions)
    engine.dispose()


def _ack(rid: str, node: str, ok: bool = True) -> AckRequest:
    return AckRequest(rollout_id=rid, node_id=node, ok=ok, prepare_s=0.5, bytes_read=10)


def test_a_rollout_goes_from_prepare_to_commit_to_complete(store) -> None:
    r, _ = store.create_rollout(_req(), "r1", now=100.0, prepare_timeout_s=30)
    assert (r.phase, r.version, r.from_version, r.nodes) == ("preparing", 1, None, ["a", "b"])
    assert r.prepare_deadline == 130.0
    with pytest.raises(NotFound):
        store.deployment("d")  # nothing committed yet
    store.add_ack(_ack("r1", "a"), now=101.0)
    assert store.get_rollout("r1").acked_at is None
    r = store.add_ack(_ack("r1", "b"), now=102.0)
    assert r.acked_at == 102.0 and r.prepare_s == 2.0
    r = store.commit("r1", now=102.5)
    assert r.phase == "committed" and r.commit_s == 0.5
    dep = store.deployment("d")
    assert dep.active_version == 1 and dep.entry.stage_id == "d.v1.s0"
    assert store.complete("r1", "nothing to drain", now=103.0).phase == "completed"
    assert [r.id for r in store.in_flight()] == []


def test_versions_must_grow_and_one_rollout_at_a_time(store) -> None:
    store.create_rollout(_req(), "r1", now=0, prepare_timeout_s=30)
    with pytest.raises(Conflict, match="still preparing") as busy:
        store.create_rollout(_req(), "r2", now=0, prepare_timeout_s=30)
    assert busy.value.kind == "rollout_in_flight"  # the orchestrator waits on this field
    store.abort("r1", "test", now=1)
    with pytest.raises(Conflict, match="not newer than version 1") as stale:
        store.create_rollout(_req(version=1), "r2", now=2, prepare_timeout_s=30)
    assert stale.value.kind == "version_not_newer"
    r, _ = store.create_rollout(_req(), "r2", now=2, prepare_timeout_s=30)
    assert r.version == 2  # an aborted version's number is never reused
    for n in ("a", "b"):
        store.add_ack(_ack("r2", n), now=3)
    store.commit("r2", now=4)
    with pytest.raises(Conflict, match="still committed") as draining:
        store.create_rollout(_req(), "r3", now=5, prepare_timeout_s=30)
    assert draining.value.kind == "rollout_in_flight"
    store.complete("r2", "drained", now=6)
    with pytest.raises(Conflict, match="serves model"):
        store.create_rollout(_req(model="tiny-gpt2"), "r3", now=7, prepare_timeout_s=30)
    r, _ = store.create_rollout(_req(version=10), "r3", now=7, prepare_timeout_s=30)
    assert (r.version, r.from_version) == (10, 2)


def test_acks_are_checked_against_the_rollout(store) -> None:
    store.create_rollout(_req(), "r1", now=0, prepare_timeout_s=30)
    with pytest.raises(NotFound):
        store.add_ack(_ack("nope", "a"), now=1)
    with pytest.raises(Conflict, match="no stage in rollout"):
        store.add_ack(_ack("r1", "z"), now=1)
    store.add_ack(_ack("r1", "a", ok=False), now=1)
    r = store.add_ack(_ack("r1", "a", ok=True), now=2)  # a retried ack replaces the earlier one
    assert [(a.node_id, a.ok) for a in r.acks] == [("a", True)]
    store.abort("r1", "b died", now=3)
    with pytest.raises(Conflict, match="only while preparing"):
        store.add_ack(_ack("r1", "b"), now=4)


def test_illegal_transitions_are_refused_and_change_nothing(store) -> None:
    store.create_rollout(_req(), "r1", now=0, prepare_timeout_s=30)
    with pytest.raises(IllegalTransition):
        store.complete("r1", "too early", now=1)
    store.commit("r1", now=1)
    with pytest.raises(IllegalTransition):
        store.abort("r1", "too late", now=2)
    assert store.get_rollout("r1").phase == "committed"
    assert store.deployment("d").active_version == 1


def test_snapshots_feed_the_desired_state_through_a_whole_rollout(store) -> None:
    def stages(node: str) -> list[str]:
        [entry] = desired_for_node(node, store.snapshots())
        # What a pull serves (cached until the next write) is always what the tables say now.
        assert store.desired(node) == [entry]
        return [s["stage_id"] for s in entry["stages"]]

    store.create_rollout(_req(), "r1", now=0, prepare_timeout_s=30)
    assert stages("a") == ["d.v1.s0"]
    for n in ("a", "b"):
        store.add_ack(_ack("r1", n), now=1)
    store.commit("r1", now=1)
    store.complete("r1", "first", now=1)
    store.create_rollout(_req(nodes=("a", "c")), "r2", now=2, prepare_timeout_s=30)
    assert stages("b") == ["d.v1.s1"] and stages("c") == ["d.v2.s1"]
    for n in ("a", "c"):
        store.add_ack(_ack("r2", n), now=3)
    store.commit("r2", now=3)
    assert stages("b") == ["d.v1.s1"]  # draining
    assert [v.status for v in store.deployment("d").versions] == ["draining", "active"]
    store.complete("r2", "drained", now=4)
    assert stages("b") == [] and stages("a") == ["d.v2.s0"]
    assert [v.status for v in store.deployment("d").versions] == ["retired", "active"]


def test_a_rollout_may_supersede_a_drain_and_releases_the_old_version(store) -> None:
    store.create_rollout(_req(), "r1", now=0, prepare_timeout_s=30)
    for n in ("a", "b"):
        store.add_ack(_ack("r1", n), now=1)
    store.commit("r1", now=2)
    store.complete("r1", "nothing to drain", now=2.5)
    store.create_rollout(_req(), "r2", now=3, prepare_timeout_s=30)
    for n in ("a", "b"):
        store.add_ack(_ack("r2", n), now=4)
    store.commit("r2", now=5)  # v2 active, v1 draining
    with pytest.raises(Conflict, match="still committed"):
        store.create_rollout(_req(), "r3", now=6, prepare_timeout_s=30)
    r3, superseded = store.create_rollout(_req(supersede_drain=True), "r3", now=6, prepare_timeout_s=30)
    assert (r3.version, r3.from_version, r3.phase) == (3, 2, "preparing")
    assert superseded.id == "r2" and superseded.phase == "completed" and "superseded" in superseded.reason
    statuses = {v.version: v.status for v in store.deployment("d").versions}
    assert statuses == {1: "retired", 2: "active", 3: "preparing"}
    # A rollout still preparing is never superseded: two PREPAREs would race.
    with pytest.raises(Conflict, match="still preparing"):
        store.create_rollout(_req(supersede_drain=True), "r4", now=7, prepare_timeout_s=30)


# A plan as broadcast stored it before stages had one type: the node under "node_id", HttpUrl's slash.
OLD_PLAN_JSON = (
    '{"model":"tiny-llama","stages":[{"node_id":"a","url":"http://a:1/","start":0,"end":3},'
    '{"node_id":"b","url":"http://b:1/","start":3,"end":6}],"format":"fp32"}'
)


def test_plans_stored_in_the_old_format_are_still_read(tmp_path) -> None:
    engine, sessions = make_engine(f"sqlite:///{tmp_path / 'old.db'}", Base)
    try:
        store = RolloutStore(sessions)
        store.create_rollout(_req(), "r1", now=0, prepare_timeout_s=30)
        for n in ("a", "b"):
            store.add_ack(_ack("r1", n), now=1)
        store.commit("r1", now=1)
        with engine.begin() as conn:  # the row as the old code wrote it
            conn.execute(sql_text("UPDATE broadcast_plan_versions SET plan_json = :p"), {"p": OLD_PLAN_JSON})
        dep = store.deployment("d")
        assert [(s.node, s.url, s.start, s.end) for s in dep.stages] == [("a", "http://a:1", 0, 3),
                                                                        ("b", "http://b:1", 3, 6)]  # fmt: skip
        assert dep.entry.stage_id == "d.v1.s0" and str(dep.entry.url) == "http://a:1/"
        [entry] = desired_for_node("b", store.snapshots())
        assert [s["stage_id"] for s in entry["stages"]] == ["d.v1.s1"]
    finally:
        engine.dispose()


def test_a_pull_is_served_from_the_cache_until_the_next_write(store) -> None:
    store.create_rollout(_req(), "r1", now=0, prepare_timeout_s=30)
    first = store.desired("a")
    reads, real = [], store.snapshots

    def counted():  # the database reads behind the pulls
        reads.append(1)
        return real()

    store.snapshots = counted
    assert store.desired("a") is first and store.desired("b") and reads == []  # b: computed, no read
    store.add_ack(_ack("r1", "a"), now=1)
    assert store.desired("a") == first and reads == [1]  # a write: read once more
    assert store.desired("b") and reads == [1]
