"""Live KV migration at a planned plan change, on real worker processes.

Two versions of a SmolLM2 chain are loaded on the same workers (a re-split:
units move between nodes, most stay); a session switches to the second at a
given step, by moving its KV caches or by a replay. Greedy fp32 text must be
the same either way and the same as without a change; a source worker killed
at the switch makes the migration fail and the replay finish the text.
"""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest

from edgeorch.local.launcher import LocalWorkers
from edgeorch.local.planned_change import ScriptedRoutes, load_version
from edgeorch.orchestration.generation import SessionStats, generate
from edgeorch.orchestration.move_cost import MoveEstimate
from edgeorch.schemas.stage import Sampling
from edgeorch.transport.hopclient import HopClient

MODEL = "smollm2-135m"
PROMPT_IDS = list(range(1000, 1100))  # 100 tokens of context before the switch
NEW_TOKENS = 10
SWITCH_AFTER = 4


def _run(routes: ScriptedRoutes, migrate_kv: bool) -> tuple[list[int], SessionStats]:
    async def go() -> tuple[list[int], SessionStats]:
        http, stats = HopClient(timeout_s=120), SessionStats()
        try:
            out = [t async for t in generate(http, routes, "mig", PROMPT_IDS, NEW_TOKENS, Sampling(), set(),
                                             stats, migrate_kv=migrate_kv)]  # fmt: skip
        finally:
            await http.aclose()
        return out, stats

    return asyncio.run(go())


@pytest.fixture(scope="module")
def workers(store, tmp_path_factory):
    with LocalWorkers(3, model_store=store.root, log_dir=tmp_path_factory.mktemp("kvmig")) as w:
        yield w


@pytest.mark.parametrize("engine", ["hf", "lean"])
def test_a_resplit_moves_kv_and_keeps_the_greedy_text(workers, engine) -> None:
    (w0, w1, _), options = workers.workers, {"engine": engine}
    v1 = load_version(f"m{engine}", 1, MODEL, [("n0", w0.url, 0, 16), ("n1", w1.url, 16, 32)], options)
    v2 = load_version(f"m{engine}", 2, MODEL, [("n0", w0.url, 0, 10), ("n1", w1.url, 10, 32)], options)
    expected, _ = _run(ScriptedRoutes(v1, v2, switch_after=None), migrate_kv=True)

    migrated, stats = _run(ScriptedRoutes(v1, v2, switch_after=SWITCH_AFTER), migrate_kv=True)
    replayed, replay_stats = _run(ScriptedRoutes(v1, v2, switch_after=SWITCH_AFTER), migrate_kv=False)

    assert migrated == expected and replayed == expected
    [move] = stats.move_paths
    assert move.path == "migrate", move.reason
    assert move.position == len(PROMPT_IDS) + SWITCH_AFTER
    # Units 10..15 crossed from n0 to n1 (6 layers); 1..9 and 16..30 were copied where they were.
    per_layer_token = 2 * 3 * 64 * 4  # keys and values, 3 KV heads of 64, fp32
    assert move.bytes_remote >= 6 * per_layer_token * move.position
    assert move.bytes_local == 24 * per_layer_token * move.position
    assert [m.path for m in replay_stats.move_paths] == ["replay"]


def test_the_gateway_replays_when_the_cost_model_prices_a_replay_below_the_migration(workers) -> None:
    w0, w1, _ = workers.workers
    v1 = load_version("mprice", 1, MODEL, [("n0", w0.url, 0, 16), ("n1", w1.url, 16, 32)])
    v2 = load_version("mprice", 2, MODEL, [("n0", w0.url, 0, 10), ("n1", w1.url, 10, 32)])
    expected, _ = _run(ScriptedRoutes(v1, v2, switch_after=None), migrate_kv=True)
    asked: list[tuple[int, int, int]] = []

    def priced(replay_s: float, migrate_s: float):
        def estimate(old, new, position):
            asked.append((old.version, new.version, position))
            return MoveEstimate(position, migrate_s=migrate_s, replay_s=replay_s, bytes_remote=1)

        return estimate

    slow_link = ScriptedRoutes(
        v1, v2, switch_after=SWITCH_AFTER, estimate=priced(replay_s=1.0, migrate_s=9.0)
    )
    replayed, stats = _run(slow_link, migrate_kv=True)
    fast_link = ScriptedRoutes(
        v1, v2, switch_after=SWITCH_AFTER, estimate=priced(replay_s=9.0, migrate_s=1.0)
    )
    migrated, migrate_stats = _run(fast_link, migrate_kv=True)

    assert replayed == expected and migrated == expected
    position = len(PROMPT_IDS) + SWITCH_AFTER
    assert asked == [(1, 2, position), (1, 2, position)]
    [move] = stats.move_paths
    assert move.path == "replay" and move.reason.startswith("cheaper: migration predicted 9.00s")
    assert (move.predicted_migrate_s, move.predicted_replay_s, move.bytes_remote) == (9.0, 1.0, 0)
    [move] = migrate_stats.move_paths
    assert move.path == "migrate" and move.bytes_remote > 0 and move.predicted_replay_s == 9.0


def test_a_source_killed_mid_migration_falls_back_to_replay(workers) -> None:
    w0, w1, w2 = workers.workers
    v1 = load_version("mcrash", 1, MODEL, [("n0", w0.url, 0, 16), ("n1", w1.url, 16, 32)])
    v2 = load_version("mcrash", 2, MODEL, [("n0", w0.url, 0, 10), ("n2", w2.url, 10, 32)])
    expected, _ = _run(ScriptedRoutes(v1, v2, switch_after=None), migrate_kv=True)

    # n1 dies as the session moves: the pull of units 16..31 finds no source.
    crash = ScriptedRoutes(v1, v2, switch_after=SWITCH_AFTER, on_switch=lambda: w1.stop(signal.SIGKILL))
    got, stats = _run(crash, migrate_kv=True)

    assert got == expected
    [move] = stats.move_paths
    assert move.path == "replay" and "unreachable" in move.reason, move


def test_kv_routes_answer_bad_requests_with_4xx(workers) -> None:
    w0, w2 = workers.workers[0], workers.workers[2]  # the crash test may have killed workers[1]
    v1 = load_version("mbad", 1, MODEL, [("n0", w0.url, 0, 16), ("n2", w2.url, 16, 32)])
    _run(ScriptedRoutes(v1, v1), migrate_kv=True)  # leaves no session: the last step releases it
    s0 = v1.stages[0].stage_id
    kv = f"{w0.url}/v1/stages/{s0}/sessions/nosuch/kv"
    assert httpx.get(kv, params={"unit_start": 1, "unit_end": 3, "start": 0, "end": 4}).status_code == 404
    assert httpx.get(kv, params={"unit_start": 0, "unit_end": 3, "start": 0, "end": 4}).status_code == 422
    pull = {"position": 4, "sources": [{"stage_id": s0, "url": w0.url, "start": 0, "end": 5}]}
    resp = httpx.post(f"{kv}/pull", json=pull)
    assert resp.status_code == 404 and "unknown" in resp.json()["detail"]
    assert httpx.post(f"{kv}/pull", json={"position": 0, "sources": []}).status_code == 422
    assert httpx.post(f"{w0.url}/v1/stages/nostage/sessions/x/kv/pull", json=pull).status_code == 404


class _KillAt(ScriptedRoutes):
    """Route provider: ``first`` until ``kill_after`` steps, when ``kill`` runs; recovery answers ``second``.

    No spot checks, nothing tainted (ScriptedRoutes' answers to the rest of RouteProvider).
    """

    def __init__(self, first, second, kill_after: int, kill):
        self.first, self.second, self.kill_after, self.kill, self.steps = first, second, kill_after, kill, 0

    async def route(self, deployment: str):
        return self.first

    async def recover(self, route, failed_node, error):
        return self.second

    def newer(self, route):
        self.steps += 1
        if self.steps == self.kill_after:
            self.kill()
        return None


def test_a_stage_killed_mid_generation_is_replayed_and_its_gap_split_into_phases(workers) -> None:
    # Last in this file: it kills workers[2], which the 4xx test uses.
    w0, w2 = workers.workers[0], workers.workers[2]
    v1 = load_version("mkill", 1, MODEL, [("n0", w0.url, 0, 16), ("n2", w2.url, 16, 32)])
    v2 = load_version("mkill", 2, MODEL, [("n0", w0.url, 0, 32)])
    expected, _ = _run(ScriptedRoutes(v1, v2, switch_after=None), migrate_kv=True)

    got, stats = _run(_KillAt(v1, v2, kill_after=SWITCH_AFTER, kill=lambda: w2.stop(signal.SIGKILL)), True)

    assert got == expected
    assert stats.recoveries == 1
    [phases] = stats.recovery_phases
    assert set(phases) == {"failed", "reroute", "replay"} and all(v >= 0 for v in phases.values()), phases
    # The replay's prefill covers the prompt and the tokens so far: not shorter than a decode step.
    assert phases["replay"] >= min(stats.step_s[1:SWITCH_AFTER]), (phases, stats.step_s)
