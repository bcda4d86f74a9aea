"""Multi-session frames on real worker processes: several sessions' tokens cross each hop as one frame.

The rows of one frame must each give their session the tokens it gets alone;
one row's failure (at any stage) must be that row's only; a malformed frame is
refused with a 4xx before any compute; and the gateway's batcher
(orchestration/batched_steps.py) must keep every session's greedy text,
including sessions that leave early and a stage killed mid-generation.
"""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import pytest
import torch

from edgeorch.local.chain import load_chain
from edgeorch.local.launcher import LocalWorkers
from edgeorch.local.planned_change import ScriptedRoutes, load_version
from edgeorch.orchestration.batched_steps import StepBatcher
from edgeorch.orchestration.generation import SessionStats, generate
from edgeorch.schemas.stage import Sampling
from edgeorch.transport import protocol, wire
from edgeorch.transport.client import ChainClient
from edgeorch.transport.hopclient import HopClient

MODEL = "tiny-llama"  # 4 layers: units 0..5
PROMPTS = [[1, 50, 60, 70, 80], [1, 7], [1, 300, 301, 302, 303, 304, 305, 306], [1, 99, 98]]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def workers(store, tmp_path_factory):
    with LocalWorkers(3, model_store=store.root, threads=1, log_dir=tmp_path_factory.mktemp("logs")) as w:
        yield w


@pytest.fixture(scope="module")
def chain(workers):
    ids = load_chain(workers, MODEL, [(0, 2), (2, 4), (4, 6)], prefix="bh")
    with ChainClient(workers.workers[0].url, ids[0]) as client:
        solo = [client.generate(p, NEW_TOKENS, stop_ids=set()).token_ids for p in PROMPTS]
        yield ids, solo


def _url(workers, i: int, stage: str) -> str:
    return f"{workers.workers[i].url}/v1/stages/{stage}/forward"


def _post(url: str, body: bytes) -> httpx.Response:
    return httpx.post(url, content=body, headers=protocol.FRAME_HEADERS, timeout=60)


def _prefill(url: str, session: str, prompt: list[int]) -> int:
    resp = _post(url, protocol.step_body({"x": torch.tensor([prompt])}, session=session, position=0))
    assert resp.status_code == 200, resp.text
    return int(wire.decode_frame(resp.content).meta["token"])


def _rows_step(url: str, rows: list[tuple[str, int, int]]) -> tuple[list[dict], list[dict]]:
    """One multi-session frame of (session, position, token) rows; the answer rows and the hops."""
    x = torch.tensor([[t] for _, _, t in rows])
    metas = [{"session": s, "position": p} for s, p, _ in rows]
    resp = _post(url, protocol.rows_body(x, metas))
    assert resp.status_code == 200, resp.text
    return wire.decode_frame(resp.content).meta["rows"], json.loads(resp.headers[protocol.HOPS_HEADER])


def _decode_in_rows(url: str, stages: list[str], prefix: str, lengths: list[int]) -> list[list[int]]:
    """Every prompt prefilled alone, then decoded in multi-session frames until its length."""
    got = {f"{prefix}{i}": [_prefill(url, f"{prefix}{i}", p)] for i, p in enumerate(PROMPTS)}
    position = {f"{prefix}{i}": len(p) for i, p in enumerate(PROMPTS)}
    while running := [s for i, s in enumerate(got) if len(got[s]) < lengths[i]]:
        rows, hops = _rows_step(url, [(s, position[s], got[s][-1]) for s in running])
        # One hop per stage for the whole frame, every row computed in one batch.
        assert [h["stage"] for h in hops] == stages and all(h["rows"] == len(running) for h in hops)
        assert all(h["batch"] >= len(running) for h in hops)
        for s, row in zip(running, rows, strict=True):
            assert row["session"] == s and "error" not in row, row
            assert row["position"] == position[s] + 1
            got[s].append(row["token"])
            position[s] += 1
    return list(got.values())


def test_rows_of_several_sessions_in_one_hop_get_their_solo_tokens(workers, chain) -> None:
    ids, solo = chain
    lengths = [NEW_TOKENS, NEW_TOKENS - 3, NEW_TOKENS, NEW_TOKENS - 5]  # sessions leave the frame early
    got = _decode_in_rows(_url(workers, 0, ids[0]), ids, "r", lengths)
    assert got == [s[:n] for s, n in zip(solo, lengths, strict=True)]


def test_rows_cross_an_int8_hop_as_each_would_alone(workers) -> None:
    # int8 scales are per token, so a row's bytes on the hop do not depend on its neighbours.
    ids = load_chain(workers, MODEL, [(0, 2), (2, 4), (4, 6)], prefix="bh8",
                     options=[{"activation_format": "int8"}, {}, {}])  # fmt: skip
    with ChainClient(workers.workers[0].url, ids[0]) as client:
        solo = [client.generate(p, NEW_TOKENS, stop_ids=set()).token_ids for p in PROMPTS]
    assert _decode_in_rows(_url(workers, 0, ids[0]), ids, "q", [NEW_TOKENS] * len(PROMPTS)) == solo


def test_a_failed_row_fails_only_its_session(workers, chain) -> None:
    ids, solo = chain
    url = _url(workers, 0, ids[0])
    tokens = {s: [_prefill(url, s, PROMPTS[i])] for i, s in enumerate(["e0", "e1", "e2"])}
    # e1 loses its cache on the second stage only (a release there relays to the third, not the first).
    released = httpx.delete(f"{workers.workers[1].url}/v1/stages/{ids[1]}/sessions/e1", timeout=10)
    assert released.json()["released"] == [ids[1], ids[2]]
    rows, _ = _rows_step(url, [
        ("e0", len(PROMPTS[0]), tokens["e0"][-1]),
        ("ghost", 5, 1),  # unknown on the first stage
        ("e1", len(PROMPTS[1]), tokens["e1"][-1]),
        ("e2", len(PROMPTS[2]) + 1, tokens["e2"][-1]),  # one position ahead of its cache
    ])  # fmt: skip
    assert [r["session"] for r in rows] == ["e0", "ghost", "e1", "e2"]
    assert rows[0]["token"] == solo[0][1]
    errors = {r["session"]: r["error"] for r in rows if "error" in r}
    assert (errors["ghost"]["kind"], errors["ghost"]["status"], errors["ghost"]["failed_stage"]) == (
        "session_missing", 404, ids[0])  # fmt: skip
    assert (errors["e1"]["kind"], errors["e1"]["failed_stage"]) == ("session_missing", ids[1])
    assert (errors["e2"]["kind"], errors["e2"]["status"]) == ("position", 409)
    # The failed sessions' neighbours go on; e2, whose cache the refusal left alone, too.
    rows, _ = _rows_step(
        url, [("e0", len(PROMPTS[0]) + 1, solo[0][1]), ("e2", len(PROMPTS[2]), tokens["e2"][-1])]
    )
    assert [r["token"] for r in rows] == [solo[0][2], solo[2][1]]


def _rows_frame(metas, x) -> bytes:
    return wire.encode_frame(wire.Frame(meta={"rows_version": 1, "rows": metas}, tensors={"x": x}))


@pytest.mark.parametrize(
    ("stage", "body_fn", "fragment"),
    [
        (0, lambda: _rows_frame([{"session": "a"}, {"session": "b"}], torch.tensor([[1]])), "2 rows"),
        (0, lambda: _rows_frame([{"session": "a"}, {"session": "a"}], torch.tensor([[1], [2]])), "two rows"),
        (0, lambda: _rows_frame([], torch.zeros(0, 1, dtype=torch.int64)), "frame metadata"),
        (0, lambda: _rows_frame([{"session": "a", "logprobs": {"top": 1}}], torch.tensor([[1]])), "logprobs"),
        (0, lambda: _rows_frame([{"session": "a"}], torch.tensor([[1, 2]])), "[rows, 1] with 1 rows"),
        (
            0,
            lambda: wire.encode_frame(
                wire.Frame(
                    meta={"rows_version": 2, "rows": [{"session": "a"}]}, tensors={"x": torch.tensor([[1]])}
                )
            ),
            "frame metadata",
        ),  # fmt: skip
        (
            0,
            lambda: wire.encode_frame(
                wire.Frame(meta={"rows_version": 1, "rows": "a"}, tensors={"x": torch.tensor([[1]])})
            ),
            "frame metadata",
        ),  # fmt: skip
        (1, lambda: _rows_frame([{"session": "a"}], torch.zeros(1, 1, 31)), "[rows, 1, 32] float32"),
        (
            1,
            lambda: wire.encode_frame(
                wire.Frame(
                    meta={"rows_version": 1, "rows": [{"session": "a"}]},
                    tensors={"x": torch.zeros(1, 1, 32), "y": torch.zeros(1)},
                )
            ),
            "exactly tensor 'x'",
        ),  # fmt: skip
    ],
)
def test_a_malformed_multi_session_frame_gets_a_4xx(workers, chain, stage, body_fn, fragment) -> None:
    ids, _ = chain
    resp = _post(_url(workers, stage, ids[stage]), body_fn())
    assert resp.status_code == 422, resp.text
    assert fragment in resp.json()["detail"]
    assert resp.json()["failed_stage"] == ids[stage]


def _generate_all(routes, prompts, lengths, batcher_rows: int, in_flight: int = 1):
    async def go():
        http = HopClient(timeout_s=60)
        batcher = StepBatcher(http, batcher_rows, in_flight) if batcher_rows > 1 else None
        stats = [SessionStats() for _ in prompts]

        async def one(i: int) -> list[int]:
            return [t async for t in generate(http, routes, "bh", prompts[i], lengths[i], Sampling(), set(),
                                              stats[i], batcher=batcher)]  # fmt: skip

        try:
            return await asyncio.gather(*(one(i) for i in range(len(prompts)))), stats, batcher
        finally:
            await http.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize("in_flight", [1, 2])
def test_the_gateway_batches_concurrent_sessions_and_keeps_their_text(workers, chain, in_flight) -> None:
    _, solo = chain
    w = workers.workers
    route = load_version(f"gw{in_flight}", 1, MODEL, [("n0", w[0].url, 0, 2), ("n1", w[1].url, 2, 4),
                                                      ("n2", w[2].url, 4, 6)])  # fmt: skip
    lengths = [NEW_TOKENS, 3, NEW_TOKENS, 5]
    got, _, batcher = _generate_all(ScriptedRoutes(route, route), PROMPTS, lengths, 8, in_flight)
    assert got == [s[:n] for s, n in zip(solo, lengths, strict=True)]
    assert batcher.rows > batcher.batches, "no frame carried more than one session"


def test_a_killed_stage_under_batched_hops_replays_every_session(workers, chain) -> None:
    _, solo = chain
    w, doomed = workers.workers, workers.add_worker("worker-doomed", wait=True)
    first = load_version("kill", 1, MODEL, [("n0", w[0].url, 0, 2), ("nx", doomed.url, 2, 4),
                                            ("n2", w[2].url, 4, 6)])  # fmt: skip
    second = load_version("kill", 2, MODEL, [("n0", w[0].url, 0, 2), ("n1", w[1].url, 2, 4),
                                             ("n2", w[2].url, 4, 6)])  # fmt: skip
    failed_nodes: list[str | None] = []

    class KillMidway(ScriptedRoutes):
        async def recover(self, route, failed_node, error):
            failed_nodes.append(failed_node)
            return second  # the killed node's stage, on n1

        def newer(self, route):
            self.steps += 1
            if self.steps == 3 * len(PROMPTS):  # every session a few tokens in
                doomed.stop(signal.SIGKILL)
            return None

    got, stats, _ = _generate_all(KillMidway(first, second), PROMPTS, [NEW_TOKENS] * len(PROMPTS), 8)
    assert got == solo
    # Every session whose step was in flight re-routed around the dead node and replayed.
    assert sum(s.recoveries for s in stats) >= 1 and set(failed_nodes) == {"nx"}
