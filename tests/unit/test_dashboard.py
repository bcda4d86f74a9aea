"""The dashboard's logic on plain records: node states, planned memory, windowed series, the event feed."""

from __future__ import annotations

import asyncio
import math

import pytest
from prometheus_client import CollectorRegistry

from edgeorch.dashboard.cluster import Placement, cluster_view, node_state, unit_memory_bytes
from edgeorch.dashboard.feed import Pulse, event_stream, sse_frame
from edgeorch.dashboard.series import Counters, SeriesRecorder, read_counters
from edgeorch.schemas.orchestrator import OrchestratorEvent
from edgeorch.schemas.plan import PlanStage
from edgeorch.schemas.profile import ModelProfile, UnitProfile
from edgeorch.schemas.stage import Emulation
from services.orchestrator.metrics import OrchestratorMetrics


def _node(node_id: str, state: str = "alive", last_seen: float | None = 100.0, **extra) -> dict:
    return {"node_id": node_id, "url": f"http://127.0.0.1/{node_id}", "state": state, "last_seen": last_seen,
            "memory_bytes": 1000, "trusted": node_id == "a", "watts": 7.5, "capacity": {"cores": 2},
            "live": {"cpu_percent": 12.0, "memory_free_bytes": 5, "queue_depth": 1, "sessions": 0},
            "speeds": {}, "profiles": {}, **extra}  # fmt: skip


def _stages(*spec: tuple[str, int, int]) -> list[PlanStage]:
    return [PlanStage(node=n, start=a, end=b) for n, a, b in spec]


@pytest.mark.parametrize(
    ("monitor", "silent_s", "suspect", "want"),
    [
        ("alive", 0.5, False, "ready"),
        ("alive", 0.5, True, "suspect"),  # a request saw a stage on it fail
        ("alive", 1.6, False, "suspect"),  # missed a heartbeat, not yet lost
        ("lost", 9.0, False, "lost"),
        ("lost", 9.0, True, "lost"),
    ],
)
def test_node_state(monitor, silent_s, suspect, want) -> None:
    state, why = node_state(monitor, silent_s, suspect)
    assert state == want
    assert (why is None) == (want == "ready")


def test_unit_memory_counts_weights_and_kv_for_every_session_as_the_cost_model_does() -> None:
    def unit(name: str, param_bytes: int, kv: float = 0.0) -> UnitProfile:
        return UnitProfile(name=name, param_bytes=param_bytes, flops_per_token=1, out_bytes_per_token=4,
                           kv_bytes_per_token=kv)  # fmt: skip

    units = [unit("embed", 100), unit("l1", 50, kv=0.5), unit("head", 10)]
    profile = ModelProfile(model="m", units=units)
    assert unit_memory_bytes(profile, context_tokens=7, max_sessions=3) == [100, 50 + math.ceil(0.5 * 21), 10]


def test_cluster_view_sums_plans_per_node_and_reports_speed_against_calibration() -> None:
    b = _node("b", speeds={"m": {"decode_flops_per_s": 2e9, "samples": 5}},
              profiles={"m": {"decode_flops_per_s": 8e9}, "n": {"decode_flops_per_s": 1e9}})  # fmt: skip
    nodes = [b, _node("a"), _node("c", state="lost", last_seen=90.0)]
    placements = [Placement("x", 3, _stages(("a", 0, 2), ("b", 2, 4), ("a", 4, 5)), [10, 20, 30, 40, 50]),
                  Placement("y", 1, _stages(("b", 0, 1)), [7])]  # fmt: skip
    links = [{"src": "b", "dst": "a", "bandwidth_bytes_per_s": 1e6, "rtt_s": 0.002, "samples": 3},
             {"src": "a", "dst": "b", "bandwidth_bytes_per_s": None, "rtt_s": None}]  # fmt: skip
    view = cluster_view(nodes, links, now=101.0, suspects=["b"], placements=placements,
                        emulations={"a": Emulation(slowdown=4.0)}, models=["m"])  # fmt: skip
    a, b_card, c = view.nodes
    assert [n.node_id for n in view.nodes] == ["a", "b", "c"]
    assert (a.state, b_card.state, c.state) == ("ready", "suspect", "lost")
    assert a.memory_planned_bytes == 10 + 20 + 50 and b_card.memory_planned_bytes == 30 + 40 + 7
    assert a.stages == ["x v3 0:2", "x v3 4:5"] and b_card.stages == ["x v3 2:4", "y v1 0:1"]
    assert a.emulation is not None and a.emulation.slowdown == 4.0 and b_card.emulation is None
    assert a.trusted and not b_card.trusted and a.silent_s == 1.0 and c.silent_s == 11.0
    m, n = b_card.speeds
    assert (m.model, m.ratio, m.samples) == ("m", 0.25, 5)
    assert (n.model, n.measured_flops_per_s, n.ratio) == ("n", None, None)
    assert [(lk.src, lk.dst) for lk in view.links] == [("a", "b"), ("b", "a")]
    assert view.models == ["m"]


def test_series_points_are_counter_differences_over_the_trailing_window() -> None:
    rec = SeriesRecorder(sample_s=2.0, window_s=4.0, keep_s=10.0)
    rec.record(0.0, {})
    rec.record(2.0, {"d": Counters(tokens=10, requests=1, request_s_sum=2.0, request_s_count=1)})
    rec.record(4.0, {"d": Counters(tokens=40, requests=3, failed=1, request_s_sum=5.0, request_s_count=3,
                                   step_s_sum=0.6, step_s_count=6)})  # fmt: skip
    rec.record(6.0, {"d": Counters(tokens=40, requests=3, failed=1, request_s_sum=5.0, request_s_count=3,
                                   step_s_sum=0.6, step_s_count=6)})  # fmt: skip
    view = rec.view()
    (series,) = view.series
    p4, p6 = series.points  # one point per snapshot with one 4 s before it
    assert (p4.t, p4.requests, p4.failed, p4.tokens_per_s) == (4.0, 3, 1, 10.0)
    assert p4.request_latency_s == pytest.approx(5.0 / 3) and p4.step_s == pytest.approx(0.1)
    assert (p6.requests, p6.tokens_per_s) == (2, 7.5)
    assert p6.request_latency_s == pytest.approx(1.5)  # (5 - 2) s over 2 requests
    assert [p.t for p in rec.view(last_s=1.0).series[0].points] == [6.0]
    with pytest.raises(ValueError):
        rec.record(5.0, {})


def test_quiet_windows_have_no_latency_and_zero_rate() -> None:
    rec = SeriesRecorder(sample_s=1.0, window_s=1.0, keep_s=5.0)
    rec.record(0.0, {"d": Counters(tokens=5)})
    rec.record(1.0, {"d": Counters(tokens=5)})
    (p,) = rec.view().series[0].points
    assert (p.tokens_per_s, p.requests, p.request_latency_s, p.step_s) == (0.0, 0, None, None)


def test_read_counters_reads_the_gateways_own_metrics() -> None:
    m = OrchestratorMetrics(CollectorRegistry())
    m.tokens.labels("d").inc(12)
    m.requests.labels("d", "generate", "ok").inc(2)
    m.requests.labels("d", "embeddings", "ok").inc()
    m.requests.labels("d", "generate", "failed").inc()
    m.request_seconds.labels("d").observe(1.5)
    m.request_seconds.labels("d").observe(0.5)
    for s in (0.1, 0.2, 0.3):
        m.step_seconds.labels("d").observe(s)
    c = read_counters(m)["d"]
    assert (c.tokens, c.requests, c.failed) == (12, 3, 1)
    assert (c.request_s_sum, c.request_s_count, c.step_s_count) == (2.0, 2, 3)
    assert c.step_s_sum == pytest.approx(0.6)


def _event(i: int) -> OrchestratorEvent:
    return OrchestratorEvent(id=i, ts=float(i), kind="keep", deployment="d", message=f"m{i}", data={"i": i})


def test_sse_frame_carries_the_log_id() -> None:
    frame = sse_frame(_event(7))
    assert frame.startswith("id: 7\ndata: {") and frame.endswith("}\n\n")
    assert OrchestratorEvent.model_validate_json(frame.split("data: ", 1)[1]) == _event(7)


def test_the_stream_sends_what_is_logged_after_since_and_wakes_on_a_pulse() -> None:
    async def scenario() -> list[str]:
        log = [_event(1), _event(2)]
        pulse = Pulse()

        async def read(after: int):
            return [e for e in log if e.id > after]

        frames: list[str] = []

        async def consume() -> None:
            async for frame in event_stream(read, pulse, since=1, poll_s=30.0, max_s=2.0):
                frames.append(frame)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        log.append(_event(3))
        t0 = asyncio.get_running_loop().time()
        pulse.beat()  # without it, event 3 would wait for the 30 s poll (past the stream's end)
        while len(frames) < 3 and not task.done():
            await asyncio.sleep(0.01)
        woke_s = asyncio.get_running_loop().time() - t0
        await task
        assert len(frames) == 3 and woke_s < 0.5, (frames, woke_s)
        return frames

    frames = asyncio.run(scenario())
    assert frames[0].startswith("retry: ")
    assert [f.split("\n", 1)[0] for f in frames[1:]] == ["id: 2", "id: 3"]


def test_a_pulse_that_moved_already_does_not_wait() -> None:
    async def scenario() -> float:
        pulse = Pulse()
        seen = pulse.count
        pulse.beat()
        t0 = asyncio.get_running_loop().time()
        assert await pulse.wait(seen, 5.0) == seen + 1
        return asyncio.get_running_loop().time() - t0

    assert asyncio.run(scenario()) < 0.1
