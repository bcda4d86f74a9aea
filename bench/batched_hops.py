"""What a multi-session frame costs on a plain 3-stage chain: the stages' compute against the rest.

Starts ``edgeorch chain``'s workers (SmolLM2 fp32, 1 thread each), prefills N
sessions alone, then posts their decode tokens as one multi-session frame per
step straight to the entry stage (no gateway, no control plane) and reads the
hops' timings: the frame's wall time, the sum of the stages' compute, and the
rest (HTTP, frame encoding and checks, the relay), medians over the steps.

    python -m bench.batched_hops --rows 1,4,8,16 --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import httpx
import torch

from edgeorch.local.chain import start_chain
from edgeorch.models.store import ModelStore
from edgeorch.security.credentials import credential_headers
from edgeorch.service.settings import CommonSettings
from edgeorch.transport import protocol, wire

RANGES = [(0, 11), (11, 21), (21, 32)]
PROMPT_TOKENS = 30


def _measure(client: httpx.Client, url: str, headers: dict, n: int, steps: int) -> dict:
    tokens, position = {}, {}
    for i in range(n):
        session, prompt = f"r{n}x{i}", list(range(1000 + i, 1000 + i + PROMPT_TOKENS))
        body = protocol.step_body({"x": torch.tensor([prompt])}, session=session, position=0)
        resp = client.post(url, content=body, headers=headers)
        resp.raise_for_status()
        tokens[session], position[session] = wire.decode_frame(resp.content).meta["token"], PROMPT_TOKENS
    wall, compute, per_stage = [], [], []
    for step in range(steps + 2):
        sessions = list(tokens)
        if n == 1:
            s = sessions[0]
            body = protocol.step_body({"x": torch.tensor([[tokens[s]]])}, session=s, position=position[s])
        else:
            x = torch.tensor([[tokens[s]] for s in sessions])
            body = protocol.rows_body(x, [{"session": s, "position": position[s]} for s in sessions])
        t0 = time.perf_counter()
        resp = client.post(url, content=body, headers=headers)
        seconds = time.perf_counter() - t0
        resp.raise_for_status()
        frame, hops = wire.decode_frame(resp.content), json.loads(resp.headers[protocol.HOPS_HEADER])
        for s, row in zip(sessions, frame.meta["rows"] if n > 1 else [frame.meta], strict=True):
            tokens[s], position[s] = row["token"], position[s] + 1
        if step >= 2:  # the first two warm the batch path
            wall.append(seconds)
            compute.append(sum(h["compute_s"] for h in hops))
            per_stage.append([h["compute_s"] for h in hops])
    med = statistics.median
    return {"rows": n, "wall_ms": med(wall) * 1e3, "compute_ms": med(compute) * 1e3,
            "rest_ms": med(w - c for w, c in zip(wall, compute, strict=True)) * 1e3,
            "stage_compute_ms": [round(med(s[i] for s in per_stage) * 1e3, 1) for i in range(len(RANGES))],
            "load_avg": os.getloadavg()[0]}  # fmt: skip


def main() -> None:
    """Measure each row count and print a Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4,8,16")
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    store = ModelStore(CommonSettings().model_store)
    chain = start_chain("smollm2-135m", RANGES, model_store=store.root)
    try:
        url = protocol.forward_url(chain.workers.workers[0].url, chain.stage_ids[0])
        headers = {**protocol.FRAME_HEADERS, **credential_headers(chain.credential)}
        with httpx.Client(timeout=300) as client:
            results = [_measure(client, url, headers, int(n), args.steps) for n in args.rows.split(",")]
    finally:
        chain.close()
    one = results[0]["wall_ms"] / results[0]["rows"]
    print(
        "| rows | frame ms | stages' compute ms | rest ms | per stage compute ms | tokens/s | x one row | load avg |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        rate = r["rows"] / r["wall_ms"] * 1e3
        print(f"| {r['rows']} | {r['wall_ms']:.1f} | {r['compute_ms']:.1f} | {r['rest_ms']:.1f} "
              f"| {' / '.join(str(c) for c in r['stage_compute_ms'])} | {rate:.1f} | {rate * one / 1e3:.2f} "
              f"| {r['load_avg']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
