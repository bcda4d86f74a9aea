"""bench/scale.py's table, the knee (what saturates first at which size) and its plot."""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

PERIOD_S = 1.0
COMMIT_TARGET_S = 10.0
TITLE = "Control plane at scale: simulated nodes (bench/scale.py)"
MEMORY_TARGET_BYTES = 1 << 30
CONTROL_PLANE = ("monitor", "splitter", "broadcast", "orchestrator", "redis")


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def saturated(row: dict) -> list[str]:
    """What failed to keep up at this size (empty: it kept up)."""
    out = []
    b = row["beats"]
    if b["delivered_ratio"] is not None and b["delivered_ratio"] < 0.95:
        out.append(f"heartbeats {b['delivered_ratio']:.0%} of due")
    if b["latency_p99_s"] is not None and b["latency_p99_s"] > PERIOD_S:
        out.append(f"heartbeat p99 {b['latency_p99_s']:.1f}s > period")
    for name in ("monitor", "orchestrator", "broadcast", "splitter"):
        if row["cpu_percent"].get(name, 0.0) > 80.0:
            out.append(f"{name} CPU {row['cpu_percent'][name]:.0f}%")
    # A loss must change the plan; a slowdown only when the orchestrator predicts a gain past the
    # policy's min_gain, so a slowdown with no new plan is a decision, not a miss (the table shows it).
    losses = [c for c in row["changes"] if c["change"] == "loss"]
    slow = [c for c in losses if c["to_commit_s"] is None or c["to_commit_s"] > COMMIT_TARGET_S]
    if slow:
        out.append(f"{len(slow)}/{len(losses)} losses not re-planned within {COMMIT_TARGET_S:g}s")
    if control_plane_rss(row) > MEMORY_TARGET_BYTES:
        out.append(f"control plane {control_plane_rss(row) / 2**20:.0f} MiB")
    return out


def control_plane_rss(row: dict) -> int:
    """Peak resident bytes of the control-plane processes together (the simulator excluded)."""
    return sum(v for k, v in row["peak_rss_bytes"].items() if k in CONTROL_PLANE)


def _main_table(rows: list[dict]) -> list[str]:
    out = ["| nodes | monitor CPU | monitor CPU ms/hb | hb median ms | hb p99 ms | hb delivered | bus msg/s | Redis cmd/s "
           "| loss→commit s | slowdown→commit s | control-plane RSS MiB | simulator CPU | load avg | saturated |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        b = r["beats"]

        def times(kind: str, r: dict = r) -> str:
            t = [c["to_commit_s"] for c in r["changes"] if c["change"] == kind]
            return ", ".join(_f(x, "{:.1f}") for x in t) or "—"

        out.append(
            f"| {r['nodes']} | {r['cpu_percent'].get('monitor', 0):.0f}% | {r['monitor_cpu_ms_per_beat']:.2f} "
            f"| {_f(b['latency_median_s'] and b['latency_median_s'] * 1e3, '{:.1f}')} "
            f"| {_f(b['latency_p99_s'] and b['latency_p99_s'] * 1e3, '{:.0f}')} "
            f"| {_f(b['delivered_ratio'], '{:.0%}')} | {r['bus_msgs_per_s']:.1f} | {r['redis_cmds_per_s']:.0f} "
            f"| {times('loss')} | {times('slowdown')} | {control_plane_rss(r) / 2**20:.0f} "
            f"| {r['cpu_percent'].get('simulator', 0):.0f}% | {r['load_avg'][0]:.1f} "
            f"| {'; '.join(saturated(r)) or 'kept up'} |"
        )
    return out


def _detail_tables(rows: list[dict]) -> list[str]:
    out = ["", "Per process (CPU % of one core over the window; peak RSS MiB):", "",
           "| nodes | " + " | ".join(f"{p} CPU | {p} MiB" for p in CONTROL_PLANE) + " |",
           "|---|" + "---|---|" * len(CONTROL_PLANE)]  # fmt: skip
    for r in rows:
        cells = [f"{r['cpu_percent'].get(p, 0):.0f}% | {r['peak_rss_bytes'].get(p, 0) / 2**20:.0f}"
                 for p in CONTROL_PLANE]  # fmt: skip
        out.append(f"| {r['nodes']} | " + " | ".join(cells) + " |")
    out += ["", "Planner through the splitter, 80-layer profile (time limit per call as given):", "",
            "| nodes | objective | links sent | request MB | wall s | solver s | proven optimal | gap |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        for p in r["planner"]:
            gap = "—" if p["gap"] is None else f"{p['gap']:.2%}"
            out.append(f"| {r['nodes']} | {p['objective']} | {p['links']} | {p['request_bytes'] / 1e6:.1f} "
                       f"| {p['wall_s']:.2f} | {_f(p['solver_s'])} | {p['optimal']} | {gap} |")  # fmt: skip
    out += [
        "",
        "Rollouts (creation to COMMIT) by nodes touched k:",
        "",
        "| nodes | k | rollouts | median s | max s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        by_k: dict[int, list[float]] = {}
        for ro in r["rollouts"]:
            by_k.setdefault(ro["k"], []).append(ro["to_commit_s"])
        for k, ts in sorted(by_k.items()):
            out.append(f"| {r['nodes']} | {k} | {len(ts)} | {statistics.median(ts):.2f} | {max(ts):.2f} |")
    return out


def markdown(
    rows: list[dict], args: argparse.Namespace, title: str = TITLE, image: str | None = "scale.svg"
) -> str:
    """The tables: one row per size, then per process, planner and rollouts; the knee in words."""
    knee = next((r["nodes"] for r in rows if saturated(r)), None)
    load = ", ".join(f"{r['nodes']} nodes: {r['load_avg'][0]:.0f}" for r in rows)
    head = [f"# {title}", "",
            f"Machine: {os.cpu_count()} cores shared with other jobs; 1-minute load average at the end of each "
            f"window ({load}). CPU % is of one core, so under that load a process at a few % may be starved, "
            "not idle: the CPU per heartbeat is the figure that does not depend on the load.", "",
            *([f"![control plane against fleet size]({image})", ""] if image else []),
            f"Simulated fleet, heartbeat every {PERIOD_S:g} s, churn 1 %/min leave+join, 5 % of nodes 2x slower, "
            f"{args.window_s:g} s window per size; changes are losses and 4x slowdowns of plan nodes "
            f"(d32 and d80 in turn; — in the slowdown column: no new plan within 60 s, the orchestrator kept "
            "the plan, a decision the policy's min_gain allows). Knee: "
            + (f"first saturation at {knee} nodes." if knee else "nothing saturated at the sizes run."), ""]  # fmt: skip
    return "\n".join(head + _main_table(rows) + _detail_tables(rows))


def plot(rows: list[dict], path: Path) -> None:
    """Monitor CPU, heartbeat p99 and loss→commit time against fleet size (SVG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["nodes"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].plot(n, [r["cpu_percent"].get("monitor", 0) for r in rows], "o-", label="monitor")
    axes[0].plot(n, [r["cpu_percent"].get("orchestrator", 0) for r in rows], "s-", label="orchestrator")
    axes[0].plot(n, [r["cpu_percent"].get("broadcast", 0) for r in rows], "^-", label="broadcast")
    axes[0].set(xlabel="simulated nodes", ylabel="CPU % of one core", title="control-plane CPU")
    axes[0].legend()
    axes[1].plot(n, [(r["beats"]["latency_p99_s"] or 0) * 1e3 for r in rows], "o-")
    axes[1].axhline(PERIOD_S * 1e3, ls="--", c="grey")
    axes[1].set(xlabel="simulated nodes", ylabel="ms", title="heartbeat p99 (dashed: period)", yscale="log")
    loss = [max([c["to_commit_s"] or 99 for c in r["changes"] if c["change"] == "loss"] or [0]) for r in rows]
    axes[2].plot(n, loss, "o-")
    axes[2].axhline(COMMIT_TARGET_S, ls="--", c="grey")
    axes[2].set(xlabel="simulated nodes", ylabel="s", title="plan-node loss → committed plan (worst)")
    for ax in axes:
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
