"""Serving many users: N concurrent OpenAI streams through a local split stack.

For each variant (worker and gateway settings: ``batched`` sends concurrent
sessions' steps as one frame per hop, ``own-hops`` sends each alone,
``unbatched`` also runs each alone in every stage), a fresh local stack of ``--workers`` workers
serves SmolLM2 fp32 split over all of them (each capped so the model spans
them). Every stream is a greedy chat through the official ``openai`` client;
its text is compared with the same prompt's solo run on the same stack, so
the table also says whether batching changed a single token. Per level:
aggregate tok/s, the ratio to one stream, time to first token and
inter-token latency (p50/p95), the plan version changes during the level.

    python -m bench.serving                # levels 1,2,4,8,16; batched, own-hops and unbatched
    python -m bench.serving --quick        # levels 1,4,8; 24 tokens

Level 1 is every prompt alone, one after the other (their texts are the
reference each loaded stream is compared with); level N starts N streams
at once, prompt i % 8 each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import openai

from edgeorch.local.scenario import parse_scenario
from edgeorch.local.stack import LocalStack
from edgeorch.planning.batching import BATCH_GROWTH, predict_serving

RESULTS = Path(__file__).parent / "results"
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three uses of a paperclip.",
    "Explain in one sentence what a CPU cache is, and why it helps programs run faster.",
    "Name a famous painter.",
    "How do plants make food?",
    "Give me a tip for learning to cook.",
    "What is two plus two?",
]
# name -> (worker environment, gateway environment)
VARIANTS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    # batched decode in each stage, concurrent sessions' steps sent as one frame per hop
    "batched": ({}, {}),
    # the same, two multi-session frames in flight per entry stage (the sessions pipeline in two groups)
    "pipelined": ({}, {"EDGEORCH_HOP_BATCHES_IN_FLIGHT": "2"}),
    # batched decode in each stage, but every session's step crosses each hop alone
    "own-hops": ({}, {"EDGEORCH_HOP_BATCH_ROWS": "1"}),
    "unbatched": ({"EDGEORCH_MAX_BATCH": "1"}, {"EDGEORCH_HOP_BATCH_ROWS": "1"}),
    # every decode step padded to 4 rows: each row's bits independent of its batch (not run by default)
    "batched-exact": ({"EDGEORCH_BATCH_ROW_BLOCK": "4"}, {}),
}
DEFAULT_VARIANTS = "batched,own-hops,unbatched"


@dataclass
class Stream:
    """What one stream measured."""

    prompt: int
    text: str
    tokens: int
    started: float
    arrivals: list[float]


@dataclass
class Level:
    """One concurrency level of one variant."""

    variant: str
    streams: int
    tokens: int
    wall_s: float
    tok_per_s: float
    x_one: float
    ttft_p50_s: float
    ttft_p95_s: float
    itl_p50_s: float
    itl_p95_s: float
    same_as_solo: int
    replans: int
    load_avg: float = 0.0  # the machine's 1-minute load average as the level started
    # The cost model's figures for this level (planning/batching.py on the plan's predicted step)
    pred_tok_per_s: float = float("nan")
    pred_x_one: float = float("nan")
    pred_itl_s: float = float("nan")


def _predict(level: Level, predicted: dict | None) -> Level:
    """Fill in the cost model's prediction for the level (nothing when the plan has none)."""
    if not predicted or predicted.get("compute_step_s") is None:
        return level
    compute = predicted["compute_step_s"]
    p = predict_serving(compute, max(0.0, predicted["step_s"] - compute), level.streams, BATCH_GROWTH)
    level.pred_tok_per_s, level.pred_x_one, level.pred_itl_s = p.tokens_per_s, p.x_one, p.cycle_s
    return level


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _stream(client: openai.AsyncOpenAI, prompt: int, max_tokens: int) -> Stream:
    started = time.perf_counter()
    arrivals: list[float] = []
    parts: list[str] = []
    out = await client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": PROMPTS[prompt]}], temperature=0,
        max_tokens=max_tokens, stream=True,
    )  # fmt: skip
    async for chunk in out:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
            parts.append(chunk.choices[0].delta.content)
    return Stream(prompt, "".join(parts), len(arrivals), started, arrivals)


def _version(http: httpx.Client, url: str) -> int:
    return int(http.get(f"{url}/v1/deployments/smol").json()["version"] or 0)


async def _level(url: str, n: int, max_tokens: int) -> tuple[list[Stream], float]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    streams = await asyncio.gather(*(_stream(client, i % len(PROMPTS), max_tokens) for i in range(n)))
    wall_s = time.perf_counter() - t0
    await client.close()
    return list(streams), wall_s


def _summarise(variant: str, n: int, streams: list[Stream], wall_s: float, solo: dict[int, str],
               one: float | None, replans: int) -> Level:  # fmt: skip
    tokens = sum(s.tokens for s in streams)
    ttft = [s.arrivals[0] - s.started for s in streams if s.arrivals]
    itl = [b - a for s in streams for a, b in zip(s.arrivals, s.arrivals[1:], strict=False)]
    rate = tokens / wall_s
    load = os.getloadavg()[0]
    return Level(
        variant=variant, streams=n, tokens=tokens, wall_s=wall_s, tok_per_s=rate,
        x_one=rate / one if one else 1.0, ttft_p50_s=_pct(ttft, 0.5), ttft_p95_s=_pct(ttft, 0.95),
        itl_p50_s=_pct(itl, 0.5), itl_p95_s=_pct(itl, 0.95),
        same_as_solo=sum(1 for s in streams if s.text == solo[s.prompt]), replans=replans, load_avg=load,
    )  # fmt: skip


def run_variant(
    variant: str, envs: tuple[dict[str, str], dict[str, str]], args: argparse.Namespace
) -> list[Level]:
    """A fresh stack with ``envs`` (workers', gateway's): solo texts first, then each level."""
    scenario = parse_scenario({"workers": [{"id": f"n{i}", "memory": "400MB"} for i in range(args.workers)]})
    http = httpx.Client(timeout=300)
    with LocalStack(scenario, private_redis=True, jobs_worker=False, worker_env=envs[0],
                    service_env=envs[1]) as stack:  # fmt: skip
        url = stack.orchestrator_url
        body = {"name": "smol", "model": "smollm2-135m", "policy": {"workload": {"max_sessions": 16}}}
        r = http.post(
            f"{url}/v1/deployments", json=body, headers={"authorization": f"Bearer {stack.admin_token}"}
        )
        r.raise_for_status()
        deadline = time.monotonic() + 300
        while http.get(f"{url}/v1/deployments/smol").json()["state"] != "ready":
            if time.monotonic() > deadline:
                raise RuntimeError("deployment smol not ready after 300 s")
            time.sleep(1.0)
        # Level 1: every prompt alone, one after the other; their texts are the reference.
        v0, t0 = _version(http, url), time.perf_counter()
        alone = [asyncio.run(_solo(url, p, args.max_tokens)) for p in range(len(PROMPTS))]
        solo = {s.prompt: s.text for s in alone}
        one = _summarise(variant, 1, alone, time.perf_counter() - t0, solo, None, _version(http, url) - v0)
        predicted = http.get(f"{url}/v1/deployments/smol").json().get("predicted")
        _predict(one, predicted)
        print(_row(one), flush=True)
        levels = [one]
        for n in (n for n in args.levels if n > 1):
            v0, load, t_level = _version(http, url), os.getloadavg()[0], time.time()
            streams, wall_s = asyncio.run(_level(url, n, args.max_tokens))
            level = _summarise(variant, n, streams, wall_s, solo, one.tok_per_s, _version(http, url) - v0)
            level.load_avg = load
            if level.replans:
                _print_replans(http, url, t_level)
            _predict(level, predicted)
            levels.append(level)
            print(_row(level), flush=True)
    return levels


def _print_replans(http: httpx.Client, url: str, since_ts: float) -> None:
    """Say why the plan changed during a level (the decision log's remaps and re-splits)."""
    events = http.get(f"{url}/v1/events", params={"deployment": "smol", "limit": 10000}).json()
    for e in events:
        if e["ts"] >= since_ts and e["kind"] in ("remap", "resplit", "recover"):
            print(f"  re-plan during the level: {e['kind']}: {e['message'][:300]}", flush=True)


async def _solo(url: str, prompt: int, max_tokens: int) -> Stream:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    stream = await _stream(client, prompt, max_tokens)
    await client.close()
    return stream


HEADER = (
    "| variant | streams | tokens | aggregate tok/s | x one stream | TTFT p50 / p95 ms "
    "| inter-token p50 / p95 ms | same text as solo | re-plans | load avg "
    "| predicted tok/s | predicted x one | predicted inter-token ms |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _row(x: Level) -> str:
    same = "reference" if x.streams == 1 else f"{x.same_as_solo}/{x.streams}"
    return (
        f"| {x.variant} | {x.streams} | {x.tokens} | {x.tok_per_s:.1f} | {x.x_one:.2f} "
        f"| {x.ttft_p50_s * 1e3:.0f} / {x.ttft_p95_s * 1e3:.0f} | {x.itl_p50_s * 1e3:.0f} / {x.itl_p95_s * 1e3:.0f} "
        f"| {same} | {x.replans} | {x.load_avg:.1f} "
        f"| {x.pred_tok_per_s:.1f} | {x.pred_x_one:.2f} | {x.pred_itl_s * 1e3:.0f} |"
    )


def main() -> None:
    """Run every variant, print the table, write JSON and Markdown under bench/results/serving/."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--levels", default="1,2,4,8,16", help="concurrent streams, comma-separated")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--quick", action="store_true", help="levels 1,4,8 and 24 tokens")
    args = ap.parse_args()
    if args.quick:
        args.levels, args.max_tokens = "1,4,8", 24
    args.levels = [int(n) for n in args.levels.split(",")]
    levels: list[Level] = []
    for variant in args.variants.split(","):
        print(
            f"\n{variant}: {args.workers} workers, SmolLM2 fp32, {args.max_tokens} tokens per stream\n{HEADER}"
        )
        levels += run_variant(variant, VARIANTS[variant], args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps([asdict(x) for x in levels], indent=1))
    table = "\n".join([HEADER, *(_row(x) for x in levels)])
    title = f"# Serving many users: {args.workers} workers, SmolLM2 fp32, {args.max_tokens} tokens per stream"
    (RESULTS / "serving.md").write_text(f"{title}\n\n{table}\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
