"""One stream through the gateway against `edgeorch chain` on the very same stages.

A local stack of ``--workers`` workers serves SmolLM2 fp32 (each worker capped
so the model spans them, as in :mod:`bench.serving`). Once the deployment is
ready, the same unit ranges are loaded a second time on the same worker
processes as a plain chain (``load_chain``: no control plane, its own
credential), so both paths run the same code, weights, threads and hops.
Rounds alternate the two: the chain driven by :class:`ChainClient` (what
``edgeorch chain`` does) and one streamed chat through the official
``openai`` client, with the same prompt ids and token count.

Per round: the chain's median decode step, the gateway's median
inter-token gap (SSE chunk arrivals), and the ratio chain ÷ gateway in
tokens per second. The median over rounds is the figure.

    python -m bench.gateway_path [--rounds 5] [--tokens 48] [--workers 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import httpx
import openai
import psutil

from edgeorch.local.chain import load_chain
from edgeorch.local.launcher import LocalWorkers
from edgeorch.local.scenario import parse_scenario
from edgeorch.local.stack import LocalStack
from edgeorch.models.store import ModelStore
from edgeorch.models.tokenizer import load_tokenizer
from edgeorch.orchestration.text import chat_prompt_ids
from edgeorch.security.credentials import new_credential
from edgeorch.service.auth import ADMIN_TOKEN_ENV
from edgeorch.service.settings import CommonSettings
from edgeorch.transport.client import ChainClient

RESULTS = Path(__file__).parent / "results"
PROMPT = "Explain in a few paragraphs why the sky is blue and why sunsets are red."


def _deploy(http: httpx.Client, url: str, token: str) -> dict:
    body = {"name": "smol", "model": "smollm2-135m"}
    http.post(
        f"{url}/v1/deployments", json=body, headers={"authorization": f"Bearer {token}"}
    ).raise_for_status()
    deadline = time.monotonic() + 300
    while (view := http.get(f"{url}/v1/deployments/smol").json())["state"] != "ready":
        if time.monotonic() > deadline:
            raise RuntimeError("deployment smol not ready after 300 s")
        time.sleep(1.0)
    return view


async def _gateway(url: str, tokens: int) -> tuple[float, int, list[float]]:
    """One streamed greedy chat; returns (TTFT s, chunks, inter-chunk gaps s)."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    t0, arrivals = time.perf_counter(), []
    out = await client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=tokens,
        stream=True,
    )  # fmt: skip
    async for chunk in out:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
    await client.close()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return arrivals[0] - t0, len(arrivals), gaps


def _processes(stack: LocalStack) -> dict[str, list[psutil.Process]]:
    """The stack's processes by role, the bench itself as ``client``."""
    out: dict[str, list[psutil.Process]] = {"client": [psutil.Process()]}
    for name, proc in stack.services.items():
        out.setdefault(name, []).append(psutil.Process(proc.proc.pid))
    if stack.redis_server is not None:
        out["redis"] = [psutil.Process(stack.redis_server.proc.pid)]
    out["workers"] = [psutil.Process(w.proc.pid) for w in stack.workers]
    return out


def _cpu(procs: dict[str, list[psutil.Process]]) -> dict[str, float]:
    """CPU seconds (user + system, threads included) each role has used so far."""
    return {k: sum(sum(p.cpu_times()[:2]) for p in ps) for k, ps in procs.items()}


def _cpu_per_token(before: dict[str, float], after: dict[str, float], tokens: int) -> dict[str, float]:
    return {k: 1e3 * (after[k] - before[k]) / tokens for k in before}


def _profile(stack: LocalStack, url: str, out: Path) -> None:
    """py-spy (``--profile``: its binary) samples the orchestrator through one 128-token stream."""
    import subprocess  # noqa: PLC0415 - only for this option

    pid = stack.services["orchestrator"].proc.pid
    dest = RESULTS / "gateway_path_orchestrator.txt"
    spy = subprocess.Popen([str(out), "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
                            "--output", str(dest), "--nonblocking"])  # fmt: skip
    time.sleep(1.0)
    asyncio.run(_gateway(url, 128))
    spy.send_signal(2)
    spy.wait(60)
    print(f"py-spy samples of the orchestrator: {dest}")


def _chain_ms(chain: ChainClient, ids: list[int], tokens: int) -> tuple[float, int]:
    gen = chain.generate(ids, tokens)
    return 1e3 * statistics.median(s.wall_s for s in gen.steps[1:]), len(gen.steps)


def _gateway_ms(url: str, tokens: int) -> tuple[float, int]:
    _, n, gaps = asyncio.run(_gateway(url, tokens))
    return 1e3 * statistics.median(gaps), n


PATHS = ("fresh chain", "same-worker chain", "gateway")


def _rounds(paths: dict, procs: dict[str, list[psutil.Process]], rounds: int) -> list[dict]:
    """Each round runs every path once (rotated); ms per decode token and CPU ms per token by process."""
    rows = []
    names = list(paths)
    for r in range(rounds):
        row: dict = {"round": r}
        for name in names[r % len(names) :] + names[: r % len(names)]:
            c0 = _cpu(procs)
            ms, n = paths[name]()
            row[name] = ms
            row[f"{name} cpu"] = _cpu_per_token(c0, _cpu(procs), n)
        rows.append(row)
        print(f"| {r} | " + " | ".join(f"{row[p]:.1f}" for p in PATHS)
              + f" | {row['fresh chain'] / row['gateway']:.3f} | {row['same-worker chain'] / row['gateway']:.3f} |",
              flush=True)  # fmt: skip
    return rows


def main() -> None:
    """Run the rounds, print the tables, write bench/results/gateway_path.json."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--idle-s", type=float, default=10.0, help="seconds of no traffic: background CPU")
    ap.add_argument(
        "--profile", default="", help="a py-spy binary: sample the orchestrator through one stream"
    )
    args = ap.parse_args()
    scenario = parse_scenario({"workers": [{"id": f"n{i}", "memory": "400MB"} for i in range(args.workers)]})
    tok = load_tokenizer(ModelStore(CommonSettings().model_store).path("smollm2-135m"))
    ids = chat_prompt_ids(tok, [{"role": "user", "content": PROMPT}])
    http = httpx.Client(timeout=300)
    load_before = os.getloadavg()
    with LocalStack(scenario, private_redis=True, jobs_worker=False) as stack:
        url = stack.orchestrator_url
        view = _deploy(http, url, stack.admin_token)
        stages = view["stages"]
        ranges = [(s["start"], s["end"]) for s in stages]
        print(f"plan v{view['version']}: {[(s['node'], s['start'], s['end']) for s in stages]}", flush=True)
        urls = [stack.worker(s["node"]).url for s in stages]
        credential = new_credential()
        sids = load_chain(urls, "smollm2-135m", ranges, prefix="cmp", token=stack.admin_token,
                          credential=credential)  # fmt: skip
        same = ChainClient(urls[0], sids[0], credential=credential)
        # `edgeorch chain`: its own workers (no agent, no control plane), same ranges and threads.
        fresh_workers = LocalWorkers(
            len(ranges), threads=stack.torch_threads, extra_env={ADMIN_TOKEN_ENV: ""}
        )
        fresh_ids = load_chain(fresh_workers, "smollm2-135m", ranges, prefix="fresh", credential=credential)
        fresh = ChainClient(fresh_workers.workers[0].url, fresh_ids[0], credential=credential)
        procs = _processes(stack)
        procs["fresh workers"] = [psutil.Process(w.proc.pid) for w in fresh_workers.workers]
        paths = {"fresh chain": lambda: _chain_ms(fresh, ids, args.tokens),
                 "same-worker chain": lambda: _chain_ms(same, ids, args.tokens),
                 "gateway": lambda: _gateway_ms(url, args.tokens)}  # fmt: skip
        for c in (fresh, same):
            c.generate(ids, 4)  # warm every path once
        asyncio.run(_gateway(url, 4))
        print("\nms per decode token\n| round | " + " | ".join(PATHS)
              + " | fresh ÷ gateway | same ÷ gateway |\n|---:|---:|---:|---:|---:|---:|")  # fmt: skip
        c0, t0 = _cpu(procs), time.perf_counter()
        time.sleep(args.idle_s)  # no traffic: what the stack burns by itself
        idle = _cpu_per_token(c0, _cpu(procs), 1)
        idle = {k: v / (time.perf_counter() - t0) for k, v in idle.items()}
        try:
            rows = _rounds(paths, procs, args.rounds)
        finally:
            same.close()
            fresh.close()
            fresh_workers.stop()
        if args.profile:
            _profile(stack, url, Path(args.profile))
    load_after = os.getloadavg()
    med = {p: statistics.median(x[p] for x in rows) for p in PATHS}
    ratio = {k: statistics.median(x[k] / x["gateway"] for x in rows) for k in PATHS[:2]}
    print(f"\nmedian over {args.rounds} rounds: fresh chain {med['fresh chain']:.1f}, same-worker chain "
          f"{med['same-worker chain']:.1f}, gateway {med['gateway']:.1f} ms/token; gateway tok/s ÷ fresh chain "
          f"{ratio['fresh chain']:.3f}x, ÷ same-worker chain {ratio['same-worker chain']:.3f}x; "
          f"load {load_before[0]:.1f} -> {load_after[0]:.1f}")  # fmt: skip
    roles = rows[0]["gateway cpu"].keys()
    print("\nCPU ms per token by process (median over rounds), and per second with no traffic\n| process | "
          + " | ".join(PATHS) + " | idle ms/s |\n|---|---:|---:|---:|---:|")  # fmt: skip
    for k in roles:
        cells = [f"{statistics.median(x[f'{p} cpu'][k] for x in rows):.1f}" for p in PATHS]
        print(f"| {k} | {' | '.join(cells)} | {idle[k]:.1f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gateway_path.json").write_text(json.dumps({
        "rounds": rows, "median_ms": med, "gateway_over": ratio, "plan": ranges, "workers": args.workers,
        "tokens": args.tokens, "idle_cpu_ms_per_s": idle, "load": [load_before, load_after]}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
