"""Real worker processes on loopback: the forward path, its errors, emulation, metrics."""

from __future__ import annotations

import statistics
import struct
import time

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from edgeorch import wire
from edgeorch.chain import load_chain
from edgeorch.client import ChainClient, ChainError
from edgeorch.launcher import LocalWorkers
from edgeorch.runtime.logprobs import read_logprobs

MODEL = "tiny-llama"  # 4 layers: units 0..5


@pytest.fixture(scope="module")
def workers(store, tmp_path_factory):
    with LocalWorkers(3, model_store=store.root, threads=1, log_dir=tmp_path_factory.mktemp("logs")) as w:
        yield w


@pytest.fixture(scope="module")
def chain(workers):
    ids = load_chain(workers, MODEL, [(0, 2), (2, 4), (4, 6)], prefix="t")
    with ChainClient(workers.workers[0].url, ids[0]) as client:
        yield ids, client


def _post(url: str, body: bytes) -> httpx.Response:
    return httpx.post(url, content=body, headers={"content-type": wire.CONTENT_TYPE}, timeout=30)


def _fwd(workers, i: int, stage: str) -> str:
    return f"{workers.workers[i].url}/v1/stages/{stage}/forward"


def test_generation_matches_the_unsplit_model(store, chain) -> None:
    _, client = chain
    ref = AutoModelForCausalLM.from_pretrained(str(store.path(MODEL)), dtype=torch.float32).eval()
    prompt = [1, 50, 60, 70, 80]
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    gen = client.generate(prompt, 12)
    assert gen.token_ids == out[0, len(prompt) :].tolist()
    hops = gen.steps[-1].hops
    assert [h["node"] for h in hops] == ["worker-0", "worker-1", "worker-2"]
    assert hops[0]["bytes_out"] > 0 and hops[0]["downstream_s"] > 0


def test_put_stage_is_idempotent_and_conflicts_are_refused(workers, chain) -> None:
    ids, _ = chain
    url = f"{workers.workers[2].url}/v1/stages/{ids[2]}"
    same = httpx.put(url, json={"model": MODEL, "start": 4, "end": 6, "next": None})
    assert same.status_code == 200 and same.json()["param_bytes"] > 0
    other = httpx.put(url, json={"model": MODEL, "start": 3, "end": 6, "next": None})
    assert other.status_code == 409 and "another spec" in other.json()["detail"]
    bad = httpx.put(f"{workers.workers[2].url}/v1/stages/x", json={"model": MODEL, "start": 2, "end": 99})
    assert bad.status_code == 422 and "units [0, 6)" in bad.json()["detail"]
    missing = httpx.put(f"{workers.workers[2].url}/v1/stages/y", json={"model": "nope", "start": 0, "end": 1})
    assert missing.status_code == 404 and "not in the store" in missing.json()["detail"]


def _frame(meta: dict, **tensors) -> bytes:
    return wire.encode_frame(wire.Frame(meta=meta, tensors=tensors))


@pytest.mark.parametrize(
    ("body_fn", "status", "fragment"),
    [
        (lambda: b"\x00garbage" * 10, 400, "not an edgeorch frame"),
        (lambda: _frame({"session": "s"}, x=torch.zeros(1, 3)), 422, "int64 token ids"),
        (lambda: _frame({"session": "s"}, x=torch.tensor([[1, 99999]])), 422, "token ids must be in"),
        (lambda: _frame({"session": "s", "bogus": 1}, x=torch.tensor([[1]])), 422, "frame metadata"),
        (lambda: _frame({"session": "s", "mode": "encode"}, x=torch.tensor([[1]])), 422, "encoder models"),
        (lambda: _frame({"session": "s"}, x=torch.tensor([[1], [2]])), 422, "batch 2"),
        (lambda: _frame({"session": "s"}, y=torch.tensor([[1]])), 422, "carries tensor 'x'"),
        (lambda: _frame({"session": "nope", "position": 3}, x=torch.tensor([[1]])), 404, "unknown on stage"),
        (
            lambda: _frame({"session": "s", "logprobs": {"top": 21}}, x=torch.tensor([[1]])),
            422,
            "frame metadata",
        ),
        (
            lambda: _frame({"session": "s", "logprobs": {"top": 1, "k": 2}}, x=torch.tensor([[1]])),
            422,
            "metadata",
        ),
    ],
)
def test_bad_input_gets_a_clear_4xx(workers, chain, body_fn, status, fragment) -> None:
    ids, _ = chain
    resp = _post(_fwd(workers, 0, ids[0]), body_fn())
    assert resp.status_code == status, resp.text
    assert fragment in resp.json()["detail"]


def test_byte_count_not_matching_shape_is_refused(workers, chain) -> None:
    ids, _ = chain
    good = _frame({"session": "s"}, x=torch.zeros(1, 2, 32))
    for body in (good[:-4], good + b"\x00\x00\x00\x00"):
        resp = _post(_fwd(workers, 1, ids[1]), body)
        assert resp.status_code == 400 and "payload bytes" in resp.json()["detail"]
    nan = _frame({"session": "s"}, x=torch.full((1, 2, 32), float("nan")))
    assert _post(_fwd(workers, 1, ids[1]), nan).status_code == 422
    wrong_width = _frame({"session": "s"}, x=torch.zeros(1, 2, 31))
    resp = _post(_fwd(workers, 1, ids[1]), wrong_width)
    assert resp.status_code == 422 and "[batch, tokens, 32]" in resp.json()["detail"]
    header = b'{"meta": {}, "tensors": [{"name": "x", "dtype": "complex128", "shape": [1]}]}'
    odd = b"EOW1" + struct.pack("<I", len(header)) + header + b"\x00" * 16
    resp = _post(_fwd(workers, 1, ids[1]), odd)
    assert resp.status_code == 400 and "unknown dtype" in resp.json()["detail"]


def test_oversize_body_is_413_and_unknown_stage_404(workers, chain) -> None:
    ids, _ = chain
    big = _post(_fwd(workers, 0, ids[0]), b"\x00" * (65 << 20))
    assert big.status_code == 413
    assert (
        _post(_fwd(workers, 0, "no.such.stage"), _frame({"session": "s"}, x=torch.tensor([[1]]))).status_code
        == 404
    )
    bad_id = _post(_fwd(workers, 0, "-starts-with-a-dash"), _frame({"session": "s"}, x=torch.tensor([[1]])))
    assert bad_id.status_code == 422 and "must match" in bad_id.json()["detail"]


def test_forward_is_documented_and_served_by_the_fast_route(workers) -> None:
    schema = httpx.get(f"{workers.workers[0].url}/openapi.json").json()
    assert "post" in schema["paths"]["/v1/stages/{stage_id}/forward"]
    # Served without FastAPI's parameter checks, so its own check answers (not a list of errors).
    resp = _post(_fwd(workers, 0, "bad id"), b"")
    assert resp.status_code == 422 and isinstance(resp.json()["detail"], str)


def test_position_mismatch_is_409_and_session_survives(chain) -> None:
    _, client = chain
    client.step({"x": torch.tensor([[1, 2, 3]])}, session="pm", position=0)
    with pytest.raises(ChainError) as err:
        client.step({"x": torch.tensor([[4]])}, session="pm", position=5)
    assert err.value.status == 409 and "at position 3" in err.value.detail
    # The refused step changed nothing: the right position still works.
    res = client.step({"x": torch.tensor([[4]])}, session="pm", position=3, release=True)
    assert res.frame.meta["position"] == 4


def test_worker_keeps_serving_after_errors(chain) -> None:
    _, client = chain
    for _ in range(3):
        with pytest.raises(ChainError):
            client.step({"x": torch.tensor([[1]])}, session="gone", position=7)
    assert len(client.generate([1, 2, 3], 4).token_ids) == 4


def test_downstream_down_is_502_naming_the_hop(store, tmp_path) -> None:
    with LocalWorkers(2, model_store=store.root, threads=1, log_dir=tmp_path) as w:
        ids = load_chain(w, MODEL, [(0, 3), (3, 6)], prefix="dd")
        w.workers[1].stop()
        with ChainClient(w.workers[0].url, ids[0]) as client, pytest.raises(ChainError) as err:
            client.generate([1, 2, 3], 2)
    assert err.value.status == 502
    assert "next hop 'dd.s1'" in err.value.detail and "unreachable" in err.value.detail


def test_full_kv_cache_is_503_not_a_crash(store, tmp_path) -> None:
    # 4 layers × (K and V) × 2 kv-heads × 8 dims × 4 B = 512 B per token: one 10-token session fits.
    env = {"EDGEORCH_KV_CACHE_MAX_BYTES": "8192"}
    with LocalWorkers(1, model_store=store.root, threads=1, log_dir=tmp_path, extra_env=env) as w:
        ids = load_chain(w, MODEL, [(0, 6)], prefix="kv")
        with ChainClient(w.workers[0].url, ids[0]) as client:
            client.step({"x": torch.tensor([[1] * 10])}, session="a", position=0)
            with pytest.raises(ChainError) as err:
                client.step({"x": torch.tensor([[1] * 10])}, session="b", position=0)
            assert err.value.status == 503 and "KV cache full" in err.value.detail
            client.release("a")
            assert (
                client.step({"x": torch.tensor([[1] * 10])}, session="b", position=0).frame.meta["token"] >= 0
            )


def test_emulated_slowdown_and_link_show_in_timings(workers, chain) -> None:
    ids, client = chain
    admin = f"{workers.workers[1].url}/v1/admin/emulation"
    client.generate([1, 2, 3], 3)  # warm
    # Medians of 3: a single step of this tiny model varies by tens of per cent on 2 shared cores.
    base = statistics.median(
        client.step({"x": torch.tensor([[5] * 64])}, session="e0").hops[1]["compute_s"] for _ in range(3)
    )
    assert httpx.post(admin, json={"slowdown": 5.0, "rtt_ms": 100}).status_code == 200
    try:
        steps = [client.step({"x": torch.tensor([[5] * 64])}, session=f"e{i}") for i in range(1, 4)]
        slowed = statistics.median(r.hops[1]["compute_s"] for r in steps)
        assert slowed >= 3.0 * base, (slowed, base)
        res = steps[-1]
        # Worker 1's outgoing hop now costs at least one emulated RTT.
        assert res.hops[1]["downstream_s"] >= 0.1
        assert httpx.get(admin).json()["slowdown"] == 5.0
        assert httpx.post(admin, json={"slowdown": 0.5}).status_code == 422
    finally:
        httpx.post(admin, json={"slowdown": 1.0, "rtt_ms": 0})


def test_bandwidth_pacing_delays_outgoing_activations(workers, chain) -> None:
    ids, client = chain
    admin = f"{workers.workers[0].url}/v1/admin/emulation"
    httpx.post(admin, json={"bandwidth_mbps": 1.0})
    try:
        t0 = time.perf_counter()
        res = client.step({"x": torch.tensor([[5] * 500])}, session="bw")  # 500 × 32 × 4 B = 64 kB out
        elapsed = time.perf_counter() - t0
        assert res.hops[0]["bytes_out"] > 64_000
        assert elapsed >= res.hops[0]["bytes_out"] * 8 / 1e6 * 0.95
    finally:
        httpx.post(admin, json={})


def test_probes_metrics_and_docs(workers, chain) -> None:
    _, client = chain
    client.generate([1, 2], 2)
    url = workers.workers[0].url
    assert httpx.get(url + "/healthz").json()["status"] == "ok"
    assert httpx.get(url + "/readyz").status_code == 200
    metrics = httpx.get(url + "/metrics").text
    for name in (
        "edgeorch_worker_stage_compute_seconds_count",
        "edgeorch_worker_unit_compute_seconds_count",
        "edgeorch_worker_bytes_in_total",
        "edgeorch_worker_bytes_out_total",
        "edgeorch_worker_requests_total",
    ):
        assert name in metrics, name
    assert 'edgeorch_worker_errors_total{kind="bad_frame"}' in metrics
    spec = httpx.get(url + "/openapi.json").json()
    assert "/v1/stages/{stage_id}/forward" in spec["paths"] and "/v1/admin/emulation" in spec["paths"]
    assert httpx.get(url + "/docs").status_code == 200


def test_the_last_stage_returns_only_the_logprobs_asked_for(store, chain) -> None:
    _, client = chain
    ref = AutoModelForCausalLM.from_pretrained(str(store.path(MODEL)), dtype=torch.float32).eval()
    prompt = [1, 50, 60, 70, 80]
    with torch.no_grad():
        want = torch.log_softmax(ref(torch.tensor([prompt])).logits[0, -1].float(), dim=-1)
    res = client.step({"x": torch.tensor([prompt])}, session="lp-1", mode="generate", logprobs={"top": 3},
                      release=True)  # fmt: skip
    got = read_logprobs(res.frame, 3, ref.config.vocab_size)
    assert got.token == int(torch.argmax(want)) and abs(got.logprob - want[got.token].item()) <= 1e-4
    values, ids = torch.topk(want, 3)
    assert [i for i, _ in got.top] == ids.tolist()
    assert [v for _, v in got.top] == pytest.approx(values.tolist(), abs=1e-4)
    assert res.frame.nbytes() == 4 + 3 * (8 + 4)  # the numbers asked for, not the logits
    plain = client.step({"x": torch.tensor([prompt])}, session="lp-2", mode="generate", release=True)
    assert plain.frame.tensors == {} and "logprobs_format" not in plain.frame.meta
