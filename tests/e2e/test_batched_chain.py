"""Concurrent sessions through a real 3-worker chain: batched, and each one's greedy tokens its solo run's."""

from __future__ import annotations

import threading
import time

import pytest
from transformers import AutoTokenizer

from edgeorch.local.chain import start_chain
from edgeorch.transport.client import ChainClient

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three uses of a paperclip.",
    "Explain in one sentence what a CPU cache is.",
    "Name a famous painter.",
    "How do plants make food?",
]
NEW_TOKENS = 16


@pytest.mark.slow
def test_concurrent_sessions_batch_and_keep_their_solo_tokens(store, tmp_path) -> None:
    tok = AutoTokenizer.from_pretrained(str(store.path("smollm2-135m")))
    ids = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        for p in PROMPTS
    ]
    chain = start_chain(
        "smollm2-135m", [(0, 11), (11, 21), (21, 32)], model_store=store.root, log_dir=tmp_path
    )
    try:
        # stop_ids empty: every session runs its full length, so sessions of
        # different lengths leave the batch at different steps.
        lengths = [NEW_TOKENS - 2 * (i % 3) for i in range(len(PROMPTS))]
        solo = [
            chain.client.generate(p, n, stop_ids=set()).token_ids for p, n in zip(ids, lengths, strict=True)
        ]
        url, stage = chain.workers.workers[0].url, chain.stage_ids[0]
        got: dict[int, list[int]] = {}
        batches: list[int] = []
        errors: list[BaseException] = []

        def run(i: int) -> None:
            time.sleep(0.4 * (i % 3))  # sessions join while others are mid-generation
            try:
                with ChainClient(url, stage, credential=chain.credential) as client:
                    gen = client.generate(ids[i], lengths[i], stop_ids=set())
                got[i] = gen.token_ids
                batches.extend(h.get("batch", 1) for s in gen.steps for h in s.hops)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not errors, errors
        assert [got[i] for i in range(len(PROMPTS))] == solo
        assert max(batches) > 1, "no step ran in a batch of several sessions"
        print(f"batch sizes seen: max {max(batches)}, steps in batches >1: "
              f"{sum(b > 1 for b in batches)}/{len(batches)}")  # fmt: skip
    finally:
        chain.close()
