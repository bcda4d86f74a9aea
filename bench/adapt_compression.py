"""Compression allowed against not allowed, from an adaptation scenario's runs (issue 21).

Pure functions over the raw records of ``bench/adapt_run.py``: the strategy
``adaptive`` may compress a hop's activations on a slow link, ``adaptive_fp32``
may not. Three figures side by side: the p95 after the first change, the
bytes each hop of each plan version sent per request it served, and the
format each link carried over time.
"""

from __future__ import annotations

from edgeorch.rollout.plan import parse_stage_id

PAIR = ("adaptive", "adaptive_fp32")


def formats_over_time(run: dict) -> list[dict]:
    """Every committed plan's hops: ``{t_s, version, kind, links: ["n1→n2 int8", ...]}``."""
    out = []
    for change in run.get("plan_changes", []):
        stages = change.get("stages") or []
        links = [f"{a['node']}→{b['node']} {a.get('activation_format', 'fp32')}"
                 for a, b in zip(stages, stages[1:], strict=False) if a["node"] != b["node"]]  # fmt: skip
        out.append(
            {"t_s": change["t_s"], "version": change["version"], "kind": change["kind"], "links": links}
        )
    return out


def bytes_per_request(run: dict) -> dict[int, dict]:
    """Per plan version: the requests that started on it, and each hop's bytes sent per such request.

    Hops are the stages that sent anything (the last stage answers upstream
    and sends nothing downstream); a request that straddles two versions
    counts on the one it started on, so the figure is an average, not exact.
    """
    served: dict[int, int] = {}
    for r in run.get("requests", []):
        if r.get("ok") and r.get("version") is not None:
            served[r["version"]] = served.get(r["version"], 0) + 1
    per: dict[int, dict[int, float]] = {}
    for sid, sent in (run.get("bytes_out") or {}).items():
        ref = parse_stage_id(sid)
        if ref is not None and sent > 0:
            per.setdefault(ref.version, {})[ref.index] = sent
    out = {}
    for version, hops in sorted(per.items()):
        n = served.get(version, 0)
        out[version] = {"requests": n, "hop_bytes": {i: hops[i] / n if n else None for i in sorted(hops)}}
    return out


def after_p95(table: dict[str, list[dict]], name: str) -> float | None:
    """The strategy's p95 in the phase after the first event."""
    rows = table.get(name) or []
    return rows[1]["p95_s"] if len(rows) > 1 else None


def compression_summary(result: dict) -> dict | None:
    """Both runs' figures and the ratio of their p95s after the first change; None unless both ran."""
    runs, table = result["runs"], result["table"]
    if any(n not in runs or runs[n].get("infeasible") for n in PAIR):
        return None
    with_c, without = after_p95(table, PAIR[0]), after_p95(table, PAIR[1])
    return {
        "p95_with_s": with_c, "p95_without_s": without,
        "without_over_with": without / with_c if with_c and without else None,
        "formats": {n: formats_over_time(runs[n]) for n in PAIR},
        "bytes": {n: bytes_per_request(runs[n]) for n in PAIR},
    }  # fmt: skip


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value / 1e6:.3f}"


def compression_lines(result: dict) -> list[str]:
    """The Markdown of :func:`compression_summary` (nothing when the pair did not both run)."""
    summary = compression_summary(result)
    if summary is None:
        return []
    ratio = summary["without_over_with"]
    verdict = "beats" if ratio is not None and ratio > 1 else "does NOT beat"
    lines = [f"Compression allowed (`adaptive`) against not allowed (`adaptive_fp32`), after the first change: "
             f"p95 {summary['p95_with_s']:.2f} s against {summary['p95_without_s']:.2f} s "
             f"(without ÷ with = {ratio:.2f}): compression **{verdict}** no compression on p95."
             if ratio is not None else "Compression allowed against not: no p95 after the change.", "",
             "| strategy | version | requests started on it | MB sent per request, per hop (stage 0, 1, …) |",
             "|---|---:|---:|---|"]  # fmt: skip
    for name in PAIR:
        for version, row in summary["bytes"][name].items():
            hops = ", ".join(_mb(b) for b in row["hop_bytes"].values())
            lines.append(f"| {name} | v{version} | {row['requests']} | {hops} |")
    lines += ["", "Format per link over time (each committed plan):", ""]
    for name in PAIR:
        steps = "; ".join(f"{f['t_s']:.1f} s {f['kind']} v{f['version']}: {', '.join(f['links']) or '(one node)'}"
                          for f in summary["formats"][name])  # fmt: skip
        lines.append(f"- **{name}**: {steps}")
    return lines
