"""Plan versions as workers see them: stage ids, next pointers, each node's desired state."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from edgeorch.rollout.plan import (
    DeploymentSnapshot,
    desired_for_node,
    kept_versions,
    newest,
    node_urls,
    parse_stage_id,
    place,
    stage_id,
)
from edgeorch.schemas.rollout import Plan, RolloutRequest


def _plan(*stages: tuple[str, int, int], model: str = "tiny-llama") -> Plan:
    return Plan.model_validate(
        {
            "model": model,
            "stages": [{"node": n, "url": f"http://{n}:8100", "start": a, "end": b} for n, a, b in stages],
        }  # fmt: skip
    )


V1 = _plan(("a", 0, 2), ("b", 2, 4), ("c", 4, 6))
V2 = _plan(("a", 0, 3), ("b", 3, 5), ("d", 5, 6))


def test_stage_ids_round_trip_and_other_ids_are_not_ours() -> None:
    sid = stage_id("chat-1", 12, 3)
    assert sid == "chat-1.v12.s3"
    ref = parse_stage_id(sid)
    assert (ref.deployment, ref.version, ref.index) == ("chat-1", 12, 3)
    for other in ("t.s0", "chat.v1", "chat.vx.s0", "a.b.v1.s0", "demo.s0"):
        assert parse_stage_id(other) is None


def test_each_stage_points_at_the_next_and_the_last_at_nothing() -> None:
    placed = place("d", 2, V2)
    assert [p.stage_id for p in placed] == ["d.v2.s0", "d.v2.s1", "d.v2.s2"]
    assert [(p.node, p.start, p.end) for p in placed] == [("a", 0, 3), ("b", 3, 5), ("d", 5, 6)]
    assert placed[0].next.stage_id == "d.v2.s1" and str(placed[0].next.url).startswith("http://b:8100")
    assert placed[1].next.stage_id == "d.v2.s2" and str(placed[1].next.url).startswith("http://d:8100")
    assert placed[2].next is None
    assert placed[0].url == "http://a:8100"  # no trailing slash


def test_a_node_with_two_stages_gets_both_and_points_at_itself() -> None:
    u_shape = _plan(("a", 0, 1), ("b", 1, 5), ("a", 5, 6))
    placed = place("u", 1, u_shape)
    assert placed[1].next.stage_id == "u.v1.s2" and str(placed[1].next.url).startswith("http://a:8100")
    assert node_urls(u_shape) == {"a": "http://a:8100", "b": "http://b:8100"}
    snap = DeploymentSnapshot("u", active_version=1, plans={1: u_shape})
    [entry] = desired_for_node("a", [snap])
    assert [s["stage_id"] for s in entry["stages"]] == ["u.v1.s0", "u.v1.s2"]


@pytest.mark.parametrize(
    "stages",
    [[("a", 0, 2), ("b", 3, 6)], [("a", 0, 3), ("b", 2, 6)], [("a", 1, 6)], [("a", 0, 2), ("b", 2, 2)]],
    ids=["gap", "overlap", "not-from-zero", "empty"],
)
def test_plans_must_tile_from_zero(stages) -> None:
    with pytest.raises(ValidationError, match="must start at|is empty"):
        _plan(*stages)


def test_deployment_names_cannot_contain_the_stage_id_separator() -> None:
    with pytest.raises(ValidationError):
        RolloutRequest(deployment="a.b", plan=V1)
    assert RolloutRequest(deployment="a_b-1", plan=V1).version is None


def _snap(phase: str | None, active: int | None = 1, version: int | None = 2) -> DeploymentSnapshot:
    snap = DeploymentSnapshot("d", active_version=active, rollout_id="r2", rollout_version=version,
                              rollout_phase=phase, rollout_from=1 if version == 2 else None)  # fmt: skip
    snap.plans = {v: p for v, p in ((1, V1), (2, V2)) if v in kept_versions(snap)}
    return snap


def _stages(node: str, snap: DeploymentSnapshot) -> list[str]:
    [entry] = desired_for_node(node, [snap])
    return [s["stage_id"] for s in entry["stages"]]


def test_while_preparing_both_versions_are_kept_and_new_nodes_must_ack() -> None:
    snap = _snap("preparing")  # active 1, rolling out 2
    assert kept_versions(snap) == [1, 2]
    [a] = desired_for_node("a", [snap])
    assert [s["stage_id"] for s in a["stages"]] == ["d.v1.s0", "d.v2.s0"]
    assert a["prepare"] == {"rollout_id": "r2", "version": 2}
    assert (a["version"], a["rank"]) == (2, 0)
    [c] = desired_for_node("c", [snap])  # only in the old plan: keeps serving, no ack asked
    assert [s["stage_id"] for s in c["stages"]] == ["d.v1.s2"] and c["prepare"] is None
    [d] = desired_for_node("d", [snap])  # only in the new plan
    assert [s["stage_id"] for s in d["stages"]] == ["d.v2.s2"] and d["prepare"]["version"] == 2


def test_after_commit_the_old_version_drains_then_is_released() -> None:
    committed = _snap("committed", active=2)
    assert kept_versions(committed) == [1, 2]
    assert _stages("c", committed) == ["d.v1.s2"]
    assert desired_for_node("a", [committed])[0]["prepare"] is None
    completed = _snap("completed", active=2)
    assert kept_versions(completed) == [2]
    assert _stages("c", completed) == []  # c must unload: the deployment is still listed
    assert _stages("b", completed) == ["d.v2.s1"]
    assert newest(committed) == (2, 1) and newest(completed) == (2, 2)


def test_an_aborted_version_is_dropped_and_the_old_one_kept() -> None:
    aborted = _snap("aborted", active=1)
    assert kept_versions(aborted) == [1]
    assert _stages("d", aborted) == []
    assert _stages("a", aborted) == ["d.v1.s0"]
    assert newest(aborted) == (2, 2)


def test_a_first_rollout_has_nothing_to_keep_but_itself() -> None:
    first = DeploymentSnapshot("d", active_version=None, rollout_id="r1", rollout_version=1,
                               rollout_phase="preparing", plans={1: V1})  # fmt: skip
    assert kept_versions(first) == [1]
    [a] = desired_for_node("a", [first])
    assert a["stages"][0]["stage_id"] == "d.v1.s0" and a["prepare"]["version"] == 1
    assert newest(DeploymentSnapshot("e", active_version=None)) == (0, 2)


def test_desired_state_is_plain_json() -> None:
    import json

    doc = desired_for_node("a", [_snap("preparing")])
    assert json.loads(json.dumps(doc)) == doc
    nxt = doc[0]["stages"][0]["next"]
    assert nxt["stage_id"] == "d.v1.s1" and nxt["url"].startswith("http://b:8100")


def test_the_plan_format_reaches_every_stage_a_node_must_load() -> None:
    int8 = Plan.model_validate({**V1.model_dump(mode="json"), "format": "int8"})
    assert {p.format for p in place("q", 1, int8)} == {"int8"}
    [entry] = desired_for_node("b", [DeploymentSnapshot("q", active_version=1, plans={1: int8})])
    assert [s["format"] for s in entry["stages"]] == ["int8"]
    assert V1.format == "fp32"  # plans stored before formats existed read as the exact format
    with pytest.raises(ValidationError):
        Plan.model_validate({**V1.model_dump(mode="json"), "format": "int3"})
