"""Lossy activation hops on real workers: fewer bytes on the hop, the same greedy text on a short answer."""

from __future__ import annotations

import httpx

from edgeorch.local.chain import load_chain
from edgeorch.local.launcher import LocalWorkers
from edgeorch.transport.client import ChainClient

PROMPT_IDS = list(range(2000, 2064))
NEW_TOKENS = 12
MAX_SHARE = {"bf16": 0.52, "int8": 0.3}  # of fp32's prefill bytes on the hop


def test_lossy_hops_send_fewer_bytes_and_keep_the_greedy_text(store, tmp_path) -> None:
    texts, prefill_bytes = {}, {}
    # One pair of workers holds the three chains (they share the loaded units).
    with LocalWorkers(2, model_store=store.root, log_dir=tmp_path) as workers:
        urls = [w.url for w in workers.workers]
        for fmt in ("fp32", "bf16", "int8"):
            ids = load_chain(urls, "smollm2-135m", [(0, 16), (16, 32)], prefix=f"act-{fmt}",
                              options=[{"activation_format": fmt}, {}])  # fmt: skip
            with ChainClient(urls[0], ids[0]) as client:
                gen = client.generate(PROMPT_IDS, NEW_TOKENS)
            texts[fmt] = gen.token_ids
            prefill_bytes[fmt] = gen.steps[0].hops[0]["bytes_out"]
    for fmt, share in MAX_SHARE.items():
        assert texts[fmt] == texts["fp32"], fmt
        assert prefill_bytes[fmt] <= share * prefill_bytes["fp32"], (fmt, prefill_bytes)


def test_a_plan_with_a_compressed_link_runs_in_that_format_between_real_workers(store, tmp_path) -> None:
    """The orchestrator's choice travels as PlanStage.activation_format: broadcast's desired state, the
    worker's StageSpec, the bytes on the hop. A second version of the same stages in fp32 (a 'reformat'
    back) sends ~3.5x the bytes for the same greedy text."""
    from transformers import AutoTokenizer

    from tests.integration.rollout_helpers import entry_client, start_rig, unique

    tok = AutoTokenizer.from_pretrained(str(store.path("smollm2-135m")))
    prompt = tok.apply_chat_template([{"role": "user", "content": "List three prime numbers."}],
                                     add_generation_prompt=True, return_dict=True)["input_ids"]  # fmt: skip
    # Probes and PREPARE given time: two SmolLM2 loads on a loaded 2-core host outlast the 1 s default.
    rig = start_rig(tmp_path, 2, EDGEORCH_PROBE_TIMEOUT_S="30", EDGEORCH_PREPARE_TIMEOUT_S="180")
    try:
        a, b = rig.workers.workers
        name, seen = unique("act"), {}
        for fmt in ("int8", "fp32"):
            plan = {"model": "smollm2-135m", "stages": [
                {"node": a.name, "url": a.url, "start": 0, "end": 16, "activation_format": fmt},
                {"node": b.name, "url": b.url, "start": 16, "end": 32}]}  # fmt: skip
            created = httpx.post(
                f"{rig.url}/v1/rollouts", json={"deployment": name, "plan": plan}, timeout=30
            )
            assert created.status_code == 201, created.text
            done = rig.wait_phase(created.json()["id"])
            assert done["phase"] == "completed", done
            dep = rig.deployment(name)
            first = dep["stages"][0]
            info = httpx.get(f"{a.url}/v1/stages/{first['stage_id']}", timeout=30).json()
            assert info["activation_format"] == fmt  # the worker loaded the stage in the plan's format
            with entry_client(dep["entry"]) as client:
                gen = client.generate(prompt, NEW_TOKENS)
            seen[fmt] = (gen.token_ids, gen.steps[0].hops[0]["bytes_out"])
    finally:
        rig.workers.stop()
        rig.broadcast.kill()
    assert seen["int8"][0] == seen["fp32"][0]
    assert seen["int8"][1] <= MAX_SHARE["int8"] * seen["fp32"][1], seen
