"""The adaptation benchmark's plot: request latency over time, one colour per strategy."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on the benchmark machines
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

COLOURS = {"adaptive": "#1b9e77", "static": "#d95f02", "even": "#7570b3",
           "memory_proportional": "#e7298a", "greedy_throughput": "#66a61e"}  # fmt: skip
CHANGE_MARKERS = {"remap": "v", "resplit": "v", "recover": "D"}


def plot_latency(result: dict, path: Path) -> None:
    """Latency of every request at the time it ended; failures as crosses; events and plan changes marked.

    At its end, not its start: a request slowed by a change then shows after the change's line.
    """
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    sc = result["scenario"]
    top = 1.0
    handles = []
    for name, run in result["runs"].items():
        colour = COLOURS.get(name, "black")
        if run.get("infeasible"):
            handles.append(Line2D([], [], color=colour, lw=0, marker="s", label=f"{name}: infeasible"))
            continue
        ok = [r for r in run["requests"] if r["ok"]]
        bad = [r for r in run["requests"] if not r["ok"]]
        xs, ys = [r["end_s"] for r in ok], [r["latency_s"] for r in ok]
        ax.plot(xs, ys, "-o", color=colour, ms=3.5, lw=1.0, alpha=0.85)
        top = max([top, *ys])
        if bad:
            ax.plot(
                [r["end_s"] for r in bad], [r["latency_s"] for r in bad], "x", color=colour, ms=6, mew=1.5
            )
        handles.append(Line2D([], [], color=colour, marker="o", ms=4,
                              label=f"{name} ({len(ok)} ok, {len(bad)} failed)"))  # fmt: skip
    ax.set_ylim(0, top * 1.3)
    # Plan changes: markers along the top, one row per strategy so they do not hide each other.
    for row, (name, run) in enumerate(r for r in result["runs"].items() if not r[1].get("infeasible")):
        y = top * (1.25 - 0.04 * row)
        for c in run["plan_changes"]:
            if c["kind"] in CHANGE_MARKERS and c["t_s"] >= 0:
                ax.plot(c["t_s"], y, CHANGE_MARKERS[c["kind"]], color=COLOURS.get(name, "black"), ms=7, mec="black",
                        mew=0.5)  # fmt: skip
    # Events: a numbered dashed line each; the legend says what each number is.
    for k, e in enumerate(sc["timeline"], start=1):
        ax.axvline(e["at_s"], color="0.35", ls="--", lw=1)
        ax.text(e["at_s"], top * 1.05, str(k), ha="center", va="center", fontsize=8,
                bbox={"boxstyle": "circle,pad=0.25", "fc": "white", "ec": "0.35"})  # fmt: skip
        handles.append(Line2D([], [], color="0.35", ls="--", label=f"{k}: {e['label']} ({e['at_s']:g} s)"))
    ax.axvspan(0, sc["warmup_s"], color="0.92", zorder=0)
    slo = result["slo"]["slo_s"]
    if slo:
        ax.axhline(slo, color="0.5", ls=":", lw=1)
        handles.append(Line2D([], [], color="0.5", ls=":", label=f"SLO {slo:.2f} s"))
    handles += [Line2D([], [], color="0.4", lw=0, marker="v", mec="black", label="plan change (remap/re-split)"),
                Line2D([], [], color="0.4", lw=0, marker="D", mec="black", label="recovery"),
                Line2D([], [], color="0.4", lw=0, marker="x", label="failed request")]  # fmt: skip
    ax.set_xlabel(
        "time the request ended (s since the load started; requests started in the grey warm-up are not counted)"
    )
    ax.set_ylabel("request latency (s)")
    ax.set_title("\n".join(textwrap.wrap(f"{sc['name']}: {sc['description']}", 95)), fontsize=10)
    ax.set_xlim(0, max(sc["duration_s"], ax.get_xlim()[1]))
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
