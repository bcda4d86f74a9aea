"""Lossy activation hops on real workers: fewer bytes on the hop, the same greedy text on a short answer."""

from __future__ import annotations

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
