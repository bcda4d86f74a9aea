"""What a worker really holds for its stage, measured from /proc: `make bench-memory`.

Per model and format, starts one worker per stage (``--threads 1``), reads
each worker's bare RSS, loads the chain, generates a few greedy tokens, then
reads from /proc per worker:

- ``planned``: the stage's ``param_bytes`` plus its KV for one session of
  ``--context`` tokens (what the worker's memory check counts);
- ``planner/held``: the planner's memory model for the stage (the unit
  profile's param bytes + KV bytes per token x ``--context``) over what the
  worker holds (``planned``);
- ``bare``: RSS of the fresh worker, which at startup has imported the
  engine's code (:func:`edgeorch.engine.import_engine`) and run a tiny model
  through every lean format (:mod:`edgeorch.engine.warmup`);
- ``peak``: ``VmHWM`` (peak RSS, anonymous and file pages) since bare (the
  peak is reset at bare through ``/proc/PID/clear_refs``), and
  ``(peak - bare) / planned``, the figure issue 16 targets at <= 1.15;
- where the growth went, from ``/proc/PID/smaps`` at the end against bare:
  ``+anon`` (KV, activations, per-session and per-thread state) and
  ``+lib`` (file pages other than the model store's: code first touched
  after bare, which the warm-up should have left at ~0);
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


def resident_split(pid: int, root: Path) -> dict[str, int]:
    """Resident bytes of a process by kind: ``store`` (files under ``root``), ``lib`` (other files), ``anon``."""
    out, root_s, inside = {"store": 0, "lib": 0, "anon": 0}, str(root.resolve()), False
    rss = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(maxsplit=1)[0]
        if "-" in first and not first.endswith(":"):
            fields = line.split()
            path = fields[5] if len(fields) >= 6 else ""
            inside = path.startswith(root_s)
            is_file = path.startswith("/")
        elif first == "Rss:":
            rss = int(line.split()[1]) * 1024
        elif first == "Anonymous:":  # comes after Rss: in each mapping's block
            anon = int(line.split()[1]) * 1024
            out["anon"] += anon
            if is_file:
                out["store" if inside else "lib"] += rss - anon
    return out


def reset_peak(pid: int) -> bool:
    """Reset the process's ``VmHWM`` to its current RSS (Linux >= 4.0); False when not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def split_even(num_units: int, n: int) -> list[tuple[int, int]]:
    """``n`` contiguous ranges of about equal unit counts."""
    cuts = [round(i * num_units / n) for i in range(n + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(n)]


def _wait_engine_imported(ws: LocalWorkers, timeout_s: float = 600.0) -> None:
    """Wait until every worker has imported and warmed up the engine (it does at startup, on a thread)."""
    deadline = time.monotonic() + timeout_s
    for w in ws.workers:
        while not httpx.get(f"{w.url}/v1/memory", timeout=30).json().get("engine_imported"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{w.url} has not imported the engine after {timeout_s:.0f} s")
            time.sleep(0.5)
    time.sleep(1.0)


def measure(store: ModelStore, model: str, fmt: str, n_stages: int, context: int, tokens: int,
            memory: int | None = None) -> list[dict]:  # fmt: skip
    """One chain of ``n_stages`` workers for ``model`` in ``fmt``; one row per worker."""
    adapter = adapter_for(load_config(store.path(model)))
    ranges = split_even(adapter.num_units, n_stages)
    profile = adapter.profile(model, weight_format=fmt).units  # the planner's memory model
    token = CommonSettings().admin_token
    env = {"EDGEORCH_ADMIN_TOKEN": token, **({"EDGEORCH_MEMORY": str(memory)} if memory else {})}
    # A generous start: on a shared, loaded machine a worker's imports alone took over 60 s.
    with LocalWorkers(n_stages, model_store=store.root, threads=1, extra_env=env, start_timeout_s=600) as ws:
        _wait_engine_imported(ws)
        bare_status = [proc_status(w.proc.pid) for w in ws.workers]
        bare = [b["VmRSS"] for b in bare_status]
        # The model's own directory, resolved: a store entry may be a link to another store.
        model_root = store.path(model).resolve()
        bare_split = [resident_split(w.proc.pid, model_root) for w in ws.workers]
        peak_reset = all([reset_peak(w.proc.pid) for w in ws.workers])
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
            split = resident_split(w.proc.pid, model_root)
            kv = int(info.get("kv_bytes") or 0)
            planned = info["param_bytes"] + kv
            share = info["param_bytes"]
            units = profile[ranges[i][0] : ranges[i][1]]
            model_bytes = sum(u.param_bytes + u.kv_bytes_per_token * context for u in units)
            rows.append({
                "model": model, "format": fmt, "stage": f"{ranges[i][0]}:{ranges[i][1]}",
                "param_bytes": share, "kv_bytes": kv, "planned": planned, "planner_over_held": model_bytes / planned,
                "bare_rss": bare[i], "peak_reset_at_bare": peak_reset, "startup_peak_rss": bare_status[i]["VmHWM"],
                "peak_rss": st["VmHWM"], "rss_anon": st["RssAnon"], "rss_file": st["RssFile"],
                "ratio": (st["VmHWM"] - bare[i]) / planned,
                "anon_growth": split["anon"] - bare_split[i]["anon"], "lib_growth": split["lib"] - bare_split[i]["lib"],
                "read_over_share": int(info.get("bytes_read") or 0) / share,
                "resident_over_share": store_resident(w.proc.pid, model_root) / share,
                "load_s": info["load_s"], "decode_tok_s": gen.decode_tokens_per_s,
            })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    """The results as a markdown table."""
    mib = 1 << 20
    head = ("| model | fmt | stage | planned MiB | bare MiB | peak MiB | (peak-bare)/planned | +anon MiB "
            "| +lib MiB | planner/held | read/share | mapped/share | load s | decode tok/s |")  # fmt: skip
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['format']} | {r['stage']} | {r['planned'] / mib:.1f} | {r['bare_rss'] / mib:.0f} "
            f"| {r['peak_rss'] / mib:.0f} | {r['ratio']:.2f} | {r['anon_growth'] / mib:.1f} | {r['lib_growth'] / mib:.1f} "
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
    p.add_argument("--store", type=Path, default=None, help="model store (default: EDGEORCH_MODEL_STORE)")
    args = p.parse_args(argv)
    store = ModelStore(args.store or CommonSettings().model_store)
    rows: list[dict] = []
    for item in args.models.split(","):
        model, _, fmt = item.partition(":")
        rows += measure(store, model, fmt or "int8", args.stages, args.context, args.tokens, args.memory)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
