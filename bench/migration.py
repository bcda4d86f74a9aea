"""The token gap a session sees at a planned re-split: KV migration vs replay, `python -m bench.migration`.

Two workers hold both versions of a SmolLM2 chain (v1: units [0,16) on n0,
[16,32) on n1; v2: [0,10) on n0, [10,32) on n1 — a re-split that moves six
layers from n0 to n1 and leaves 24 where they are). ``--sessions`` concurrent
greedy sessions with a context of ``--contexts`` tokens decode on v1; after
``--switch-after`` tokens each (every session past its prefill) the second version is committed, and every
session moves to it by replay (all its tokens as one prefill on the new
chain) or by KV migration (the new stages pull the session's KV: local copies
for the units that stay, KV frames for the ones that move). Per row: the
longest gap at the move (from a session's last token on v1 to its first on v2,
the worst session), the median of the last decode steps (after the move), the KV bytes moved over the network and
copied in place, and whether each session's text equals its text without a
plan change. Variants of one context run back to back, interleaved, so load
drift hits both alike; the ratio column is replay's gap over migration's.

Run: ``python -m bench.migration [--contexts 128,512,1500] [--sessions 1,4]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

from edgeorch.local.launcher import LocalWorkers
from edgeorch.local.planned_change import ScriptedRoutes, load_version
from edgeorch.orchestration.generation import SessionStats, generate
from edgeorch.schemas.stage import Sampling
from edgeorch.transport.hopclient import HopClient

MODEL = "smollm2-135m"
V1 = [(0, 16), (16, 32)]
V2 = [(0, 10), (10, 32)]


async def _session(
    routes: ScriptedRoutes, ids: list[int], new_tokens: int, migrate: bool, times: list[float]
):
    """One greedy session; ``times`` gets the moment each token arrived."""
    http, stats, out = HopClient(timeout_s=600), SessionStats(), []
    try:
        async for token in generate(http, routes, "bench", ids, new_tokens, Sampling(), set(), stats,
                                    migrate_kv=migrate):  # fmt: skip
            out.append(token)
            times.append(time.perf_counter())
    finally:
        await http.aclose()
    return out, stats


async def _run(v1, v2, prompts: list[list[int]], new_tokens: int, switch_after: int | None, migrate: bool):
    """Concurrent sessions; the change commits once every one has decoded ``switch_after`` tokens."""
    times: list[list[float]] = [[] for _ in prompts]
    routes = ScriptedRoutes(v1, v2, switch_after=switch_after,
                            ready=lambda: all(len(t) > switch_after for t in times))  # fmt: skip
    got = await asyncio.gather(
        *(_session(routes, p, new_tokens, migrate, t) for p, t in zip(prompts, times, strict=True))
    )
    return got, times


def _move_gap(prompt_len: int, stats: SessionStats, times: list[float]) -> float:
    """The gap between the last token before the move and the first after it."""
    [move] = stats.move_paths
    before = move.position - prompt_len + 1  # tokens generated before the move
    return times[before] - times[before - 1]


def _prompts(context: int, sessions: int) -> list[list[int]]:
    # Distinct token ids per session (a shared prefix could hide work); any ids do for a gap.
    return [[1000 + (7 * i + 13 * s) % 30000 for i in range(context)] for s in range(sessions)]


def measure(v1, v2, context: int, sessions: int, new_tokens: int, switch_after: int) -> list[dict]:
    """One context and session count: a reference run, then replay and migration."""
    prompts = _prompts(context, sessions)
    reference = [out for out, _ in asyncio.run(_run(v1, v2, prompts, new_tokens, None, True))[0]]
    rows = []
    for path in ("replay", "migrate"):
        got, times = asyncio.run(_run(v1, v2, prompts, new_tokens, switch_after, path == "migrate"))
        moves = [m for _, stats in got for m in stats.move_paths]
        after = [s for _, stats in got for s in stats.step_s[-3:]]  # decode steps after the move
        rows.append({
            "context": context, "sessions": sessions, "path": path,
            "paths_taken": sorted({m.path for m in moves}),
            "max_gap_s": max(_move_gap(context, st, t) for (_, st), t in zip(got, times, strict=True)),
            "decode_step_s": statistics.median(after),
            "bytes_remote": sum(m.bytes_remote for m in moves),
            "bytes_local": sum(m.bytes_local for m in moves),
            "same_text": [out for out, _ in got] == reference,
        })  # fmt: skip
    rows[0]["gap_ratio"] = rows[0]["max_gap_s"] / rows[1]["max_gap_s"]
    return rows


def markdown(rows: list[dict], load: str) -> str:
    """The benchmark's table."""
    lines = [
        f"KV migration vs replay at a planned re-split (SmolLM2-135M fp32, lean engine, 2 workers; {load})",
        "",
        "| context | sessions | path | longest gap at the move (s) | decode step (s) | replay/migrate gap | KV bytes over "
        "network | KV bytes copied in place | same text |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = f"{r['gap_ratio']:.1f}x" if "gap_ratio" in r else ""
        lines.append(
            f"| {r['context']} | {r['sessions']} | {r['path']} ({'/'.join(r['paths_taken'])}) | "
            f"{r['max_gap_s']:.3f} | {r['decode_step_s']:.3f} | {ratio} | {r['bytes_remote']:,} | "
            f"{r['bytes_local']:,} | {'yes' if r['same_text'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write bench/results/migration.{json,md}."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="128,512,1500")
    ap.add_argument("--sessions", default="1,4")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--switch-after", type=int, default=3, help="decode steps per session before the change")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    rows = []
    with LocalWorkers(2, threads=args.threads) as workers:
        urls = [w.url for w in workers.workers]
        v1 = load_version("bench", 1, MODEL, [(f"n{i}", urls[i], a, b) for i, (a, b) in enumerate(V1)])
        v2 = load_version("bench", 2, MODEL, [(f"n{i}", urls[i], a, b) for i, (a, b) in enumerate(V2)])
        for context in (int(c) for c in args.contexts.split(",")):
            for sessions in (int(s) for s in args.sessions.split(",")):
                rows += measure(v1, v2, context, sessions, args.new_tokens, args.switch_after)
                print(json.dumps(rows[-1]), file=sys.stderr)
    l1, l5, l15 = os.getloadavg()
    load = f"load average {l1:.1f} / {l5:.1f} / {l15:.1f} on {os.cpu_count()} cores"
    table = markdown(rows, load)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "migration.json").write_text(json.dumps({"load": load, "rows": rows}, indent=1))
    (args.out / "migration.md").write_text(table)
    return 0 if all(r["same_text"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
