"""A real worker with a memory cap: an over-budget load is refused with the bytes, the rest keeps serving."""

from __future__ import annotations

import httpx
import torch

from edgeorch.engine import load_adapter
from edgeorch.local.launcher import LocalWorkers
from edgeorch.transport.client import ChainClient
from tests.support import wait_for

CONTEXT = 256  # the KV a stage spec plans for by default: one session of 256 tokens


def _need(store, model: str, fmt: str, context: int = CONTEXT) -> int:
    """Weights + planned KV of the whole model as one lean stage, from its profile."""
    profile = load_adapter(store.path(model), "lean", fmt).profile(model)
    return sum(u.param_bytes for u in profile.units) + int(
        sum(u.kv_bytes_per_token for u in profile.units) * context
    )


def test_an_over_budget_load_is_refused_and_the_worker_keeps_serving(store, tmp_path) -> None:
    llama, gpt2 = _need(store, "tiny-llama", "int8", 300), _need(store, "tiny-gpt2", "int8")
    cap = llama + gpt2 - 1  # either fits alone, both do not
    with LocalWorkers(1, model_store=store.root, threads=1, log_dir=tmp_path,
                      extra_env={"EDGEORCH_MEMORY": str(cap)}) as ws:  # fmt: skip
        url = ws.workers[0].url
        spec = {"start": 0, "end": 6, "engine": "lean", "format": "int8"}
        # 300 planned tokens: more than one 256-token chunk, so the first step must reserve them all.
        first = httpx.put(
            f"{url}/v1/stages/a", json={"model": "tiny-llama", **spec, "kv_context": 300}, timeout=120
        )
        assert first.status_code == 201, first.text
        assert first.json()["param_bytes"] + first.json()["kv_bytes"] == llama

        over = httpx.put(f"{url}/v1/stages/b", json={"model": "tiny-gpt2", **spec}, timeout=120)
        assert over.status_code == 409
        assert (
            f"needs {gpt2} bytes" in over.json()["detail"]
            and f"{cap}-byte memory cap" in over.json()["detail"]
        )
        assert [s["stage_id"] for s in httpx.get(f"{url}/v1/stages").json()] == ["a"]

        with ChainClient(url, "a") as client:  # the stage it holds still answers
            assert len(client.generate([1, 50, 60], 4).token_ids) == 4
            client.step({"x": torch.tensor([[1, 50, 60]])}, session="held", mode="logits", logits="last")
        mem = httpx.get(f"{url}/v1/memory").json()
        assert mem["kv_held_bytes"] == first.json()["kv_bytes"]  # the open session got the planned 256 tokens
        assert mem["limit"] == cap and mem["planned_bytes"] == llama
        assert mem["rss"] > mem["planned_bytes"] and mem["rss_anon"] + mem["rss_file"] <= mem["rss"] + 4096
        # The engine's code is imported at startup, on a thread: it finishes, whatever loads meanwhile.
        wait_for(lambda: httpx.get(f"{url}/v1/memory").json()["engine_imported"], 120, "engine imported")

        assert httpx.delete(f"{url}/v1/stages/a", timeout=60).status_code == 200
        again = httpx.put(f"{url}/v1/stages/b", json={"model": "tiny-gpt2", **spec}, timeout=120)
        assert again.status_code == 201, again.text  # the released stage's bytes count no more
