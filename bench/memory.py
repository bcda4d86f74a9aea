"""What a worker really holds for its stage, measured from /proc: `make bench-memory`.

Per model and format, starts one worker per stage (``--threads 1``), reads
each worker's bare RSS, loads the chain, generates a few greedy tokens, then
reads from /proc per worker:

- ``planned``: the stage's ``param_bytes`` plus its KV for one session of
  ``--context`` tokens (what the worker's memory check counts);
- ``planner/held``: the planner's memory model for the stage (the unit
  profile's param bytes + KV bytes per token x ``--context``) over what the
  worker holds (``planned``);
- ``peak``: ``VmHWM`` (peak RSS, anonymous and file pages), and
  ``(peak - bare) / planned``, the figure issue 16 targets at <= 1.15;
- ``bare``: RSS of the fresh worker, which has imported the engine's code
  at startup (:func:`edgeorch.engine.import_engine`);
- ``ready``: RSS after the worker loaded, ran and dropped a one-unit stage
  of a small model of the family (first-use state of the kernels, not
  data), and ``(peak - ready) / planned``;
- ``read/share``: the bytes the worker's load read (unit files mapped, or
  checkpoint tensors read), over its ``param_bytes``; ``mapped/share``: the
  model-store file bytes resident in its mappings (``/proc/PID/smaps``);
- load seconds (the worker's own figure) and the chain's decode tokens/s.

Run: ``python -m bench.memory [--models smollm2-135m:int8,smollm2-135m:int4] [--stages N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx

from edgeorch.local.chain import load_chain
from edgeorch.local.launcher import LocalWorkers
from edgeorch.models import adapter_for, load_config
from edgeorch.models.store import ModelStore
from edgeorch.service.auth import admin_headers
from edgeorch.service.settings import CommonSettings
from edgeorch.transport.client import ChainClient


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def store_resident(pid: int, root: Path) -> int:
    """Bytes of files under ``root`` resident in the process's mappings (from /proc/PID/smaps)."""
    total, inside = 0, False
    root_s = str(root.resolve())
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(maxsplit=1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping header line: "addr-addr perms ... path"
            fields = line.split()
            inside = len(fields) >= 6 and fields[5].startswith(root_s)
        elif inside and first == "Rss:":
            total += int(line.split()[1]) * 1024
    return total


def split_even(num_units: int, n: int) -> list[tuple[int, int]]:
    """``n`` contiguous ranges of about equal unit counts."""
    cuts = [round(i * num_units / n) for i in range(n + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(n)]


def _wait_engine_imported(ws: LocalWorkers, timeout_s: float = 600.0) -> None:
    """Wait until every worker has imported the engine's code (it does at startup, on a thread)."""
    deadline = time.monotonic() + timeout_s
    for w in ws.workers:
        while not httpx.get(f"{w.url}/v1/memory", timeout=30).json().get("engine_imported"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{w.url} has not imported the engine after {timeout_s:.0f} s")
            time.sleep(0.5)
    time.sleep(1.0)


def _ready_rss(ws: LocalWorkers, warmup: str, token: str) -> list[int]:
    """RSS of each worker after it loaded, ran and dropped a one-unit stage of ``warmup``.

    What that leaves is code, not data: the model family's modules imported
    (transformers' modeling code, ~85 MB for Llama), the kernels' first-use
    state. A worker pays it once, whatever it serves.
    """
    headers = admin_headers(token)
    for i, w in enumerate(ws.workers):
        sid = f"warm{os.getpid()}.{i}"
        spec = {"model": warmup, "start": 0, "end": 1, "engine": "lean", "format": "int8"}
        httpx.put(f"{w.url}/v1/stages/{sid}", json=spec, headers=headers, timeout=120).raise_for_status()
        httpx.delete(f"{w.url}/v1/stages/{sid}", headers=headers, timeout=60).raise_for_status()
    time.sleep(0.5)
    return [proc_status(w.proc.pid)["VmRSS"] for w in ws.workers]


def measure(store: ModelStore, model: str, fmt: str, n_stages: int, context: int, tokens: int,
            warmup: str, memory: int | None = None) -> list[dict]:  # fmt: skip
    """One chain of ``n_stages`` workers for ``model`` in ``fmt``; one row per worker."""
    adapter = adapter_for(load_config(store.path(model)))
    ranges = split_even(adapter.num_units, n_stages)
    profile = adapter.profile(model, weight_format=fmt).units  # the planner's memory model
    token = CommonSettings().admin_token
    env = {"EDGEORCH_ADMIN_TOKEN": token, **({"EDGEORCH_MEMORY": str(memory)} if memory else {})}
    # A generous start: on a shared, loaded machine a worker's imports alone took over 60 s.
    with LocalWorkers(n_stages, model_store=store.root, threads=1, extra_env=env, start_timeout_s=600) as ws:
        _wait_engine_imported(ws)
        bare = [proc_status(w.proc.pid)["VmRSS"] for w in ws.workers]
        ready = _ready_rss(ws, warmup, token)
        opts = {"engine": "lean", "format": fmt, "kv_sessions": 1, "kv_context": context}
        ids = load_chain(ws, model, ranges, prefix=f"mem{os.getpid()}", options=opts, token=token)
        client = ChainClient(ws.workers[0].url, ids[0])
        try:
            gen = client.generate([1, 2, 3, 4, 5, 6, 7, 8], tokens)
        finally:
            client.close()
        rows = []
        for i, w in enumerate(ws.workers):
            info = httpx.get(f"{w.url}/v1/stages/{ids[i]}", timeout=30).json()
            st = proc_status(w.proc.pid)
            kv = int(info.get("kv_bytes") or 0)
            planned = info["param_bytes"] + kv
            share = info["param_bytes"]
            units = profile[ranges[i][0] : ranges[i][1]]
            model_bytes = sum(u.param_bytes + u.kv_bytes_per_token * context for u in units)
            rows.append({
                "model": model, "format": fmt, "stage": f"{ranges[i][0]}:{ranges[i][1]}",
                "param_bytes": share, "kv_bytes": kv, "planned": planned, "planner_over_held": model_bytes / planned,
                "bare_rss": bare[i],
                "ready_rss": ready[i], "peak_rss": st["VmHWM"], "rss_anon": st["RssAnon"], "rss_file": st["RssFile"],
                "ratio": (st["VmHWM"] - bare[i]) / planned, "ratio_ready": (st["VmHWM"] - ready[i]) / planned,
                "read_over_share": int(info.get("bytes_read") or 0) / share,
                "resident_over_share": store_resident(w.proc.pid, store.root) / share,
                "load_s": info["load_s"], "decode_tok_s": gen.decode_tokens_per_s,
            })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    """The results as a markdown table."""
    mib = 1 << 20
    head = ("| model | fmt | stage | planned MiB | bare MiB | ready MiB | peak MiB | (peak-bare)/planned "
            "| (peak-ready)/planned | planner/held | read/share | mapped/share | load s | decode tok/s |")  # fmt: skip
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['format']} | {r['stage']} | {r['planned'] / mib:.1f} | {r['bare_rss'] / mib:.0f} "
            f"| {r['ready_rss'] / mib:.0f} | {r['peak_rss'] / mib:.0f} | {r['ratio']:.2f} | {r['ratio_ready']:.2f} "
            f"| {r['planner_over_held']:.3f} | {r['read_over_share']:.2f} | {r['resident_over_share']:.2f} | {r['load_s']:.2f} "
            f"| {r['decode_tok_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure every model:format asked for and print the table (and JSON with --json)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m:int8,smollm2-135m:int4")
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--context", type=int, default=256, help="KV tokens per session the plan counts")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--memory", type=int, default=None, help="each worker's memory cap (EDGEORCH_MEMORY)")
    p.add_argument(
        "--warmup", default="tiny-llama", help="a small model of the same family, for the ready RSS"
    )
    p.add_argument("--store", type=Path, default=None, help="model store (default: EDGEORCH_MODEL_STORE)")
    args = p.parse_args(argv)
    store = ModelStore(args.store or CommonSettings().model_store)
    rows: list[dict] = []
    for item in args.models.split(","):
        model, _, fmt = item.partition(":")
        rows += measure(
            store, model, fmt or "int8", args.stages, args.context, args.tokens, args.warmup, args.memory
        )
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
