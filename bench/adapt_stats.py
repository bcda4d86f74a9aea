"""Statistics of the adaptation benchmark: phases, latency percentiles, SLO, time to recover.

Pure functions over the raw records bench/adapt.py writes (plain dicts, times
in seconds since the load started), so the tables can be recomputed from a
JSON file and tested without a stack.

- A *phase* is the interval between two timeline events (before the first,
  then after each). A request belongs to the phase in which it **ends**: one in
  flight when a change lands counts as after it, since it felt the change.
  Requests that start during the warm-up are left out.
- p50/p95 are over successful requests (linear interpolation between ranks);
  failed requests are counted apart and count as SLO misses.
- tokens/s: completion tokens of the phase's successful requests ÷ its length.
- Recovery after an event: among the requests that **start** after it, the
  first three in a row (by end time) whose median latency is within
  ``tolerance`` × the previous phase's p50; the time is that third request's
  end minus the event's time. A failed request counts as infinitely slow.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

PLAN_CHANGES = ("remap", "resplit", "reformat", "recover")
RECOVERY_WINDOW = 3
RECOVERY_TOLERANCE = 1.2
SLO_FACTOR = 1.5


@dataclass(frozen=True)
class Phase:
    """One interval of the run: ``[start_s, end_s)``, opened by event ``event`` (None: the first)."""

    name: str
    start_s: float
    end_s: float
    event: int | None


def phases(event_times: list[float], event_labels: list[str], warmup_s: float, end_s: float) -> list[Phase]:
    """Before the first event (from the warm-up on), then one phase per event up to the next."""
    bounds = [warmup_s, *event_times, end_s]
    out = [Phase("before", bounds[0], bounds[1], None)]
    for k, label in enumerate(event_labels):
        name = "after" if len(event_labels) == 1 else f"after {label}"
        out.append(Phase(name, bounds[k + 1], bounds[k + 2], k))
    return out


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) with linear interpolation between ranks; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def in_phase(requests: list[dict], phase: Phase, warmup_s: float, last: bool) -> list[dict]:
    """The requests that end in ``phase`` (the last phase takes every later end too)."""
    return [r for r in requests if r["start_s"] >= warmup_s and phase.start_s <= r["end_s"]
            and (last or r["end_s"] < phase.end_s)]  # fmt: skip


def phase_row(
    requests: list[dict], phase: Phase, slo_s: float | None, changes: list[dict], length_s: float
) -> dict:
    """One row of the table: counts, p50/p95, tokens/s, SLO attainment, plan changes in the phase."""
    ok = [r for r in requests if r["ok"]]
    lat = [r["latency_s"] for r in ok]
    met = sum(1 for r in ok if slo_s is not None and r["latency_s"] <= slo_s)
    return {
        "phase": phase.name,
        "start_s": phase.start_s,
        "end_s": phase.end_s,
        "requests": len(requests),
        "failed": len(requests) - len(ok),
        "p50_s": percentile(lat, 0.5),
        "p95_s": percentile(lat, 0.95),
        "tokens_per_s": sum(r["tokens"] for r in ok) / length_s if length_s > 0 else None,
        "slo_attainment": met / len(requests) if requests and slo_s is not None else None,
        "replans": sum(
            1 for c in changes if c["kind"] in PLAN_CHANGES and phase.start_s <= c["t_s"] < phase.end_s
        ),
    }


def recovery_s(
    requests: list[dict],
    event_s: float,
    reference_s: float | None,
    until_s: float = math.inf,
    window: int = RECOVERY_WINDOW,
    tolerance: float = RECOVERY_TOLERANCE,
) -> float | None:
    """Seconds from the event until ``window`` requests in a row have a median within tolerance × reference.

    Only requests that start at or after the event and end before ``until_s``
    (the next event) count. None: never within the interval (or no reference).
    """
    if reference_s is None:
        return None
    after = sorted((r for r in requests if event_s <= r["start_s"] and r["end_s"] < until_s),
                   key=lambda r: r["end_s"])  # fmt: skip
    lat = [r["latency_s"] if r["ok"] else math.inf for r in after]
    for i in range(window - 1, len(after)):
        if statistics.median(lat[i - window + 1 : i + 1]) <= tolerance * reference_s:
            return after[i]["end_s"] - event_s
    return None


def strategy_rows(
    run: dict,
    event_times: list[float],
    labels: list[str],
    warmup_s: float,
    duration_s: float,
    slo_s: float | None,
) -> list[dict]:
    """Every phase's row for one strategy's run, with the recovery time on the rows after an event."""
    reqs, changes = run["requests"], run["plan_changes"]
    end_s = max([duration_s, *(r["end_s"] for r in reqs)])
    rows, previous_p50 = [], None
    for ph in phases(event_times, labels, warmup_s, end_s):
        last = ph.end_s == end_s
        mine = in_phase(reqs, ph, warmup_s, last)
        row = phase_row(mine, ph, slo_s, changes, ph.end_s - ph.start_s)
        # The strategy's own p50 before any change as the yardstick: runs follow one another on a shared
        # machine, and this ratio is what stays comparable when the machine's speed drifts between them.
        first = rows[0]["p50_s"] if rows else row["p50_s"]
        row["p50_vs_before"] = row["p50_s"] / first if first and row["p50_s"] is not None else None
        if ph.event is not None:
            until = end_s + 1 if last else ph.end_s
            row["recovered_s"] = recovery_s(reqs, ph.start_s, previous_p50, until)
            row["reference_p50_s"] = previous_p50
            moved = [
                c["t_s"] for c in changes if c["kind"] in PLAN_CHANGES and ph.start_s <= c["t_s"] < ph.end_s
            ]
            row["replanned_after_s"] = min(moved) - ph.start_s if moved else None
        previous_p50 = row["p50_s"] if row["p50_s"] is not None else previous_p50
        rows.append(row)
    return rows


def choose_slo(runs: dict[str, dict], event_times: list[float], warmup_s: float) -> tuple[float | None, str]:
    """SLO on a request's latency: 1.5 × the adaptive strategy's p50 before the first change.

    Falls back to the first strategy that served before the change when adaptive
    did not run or could not deploy. Returns (seconds, whose p50 it is).
    """
    order = ["adaptive", *[s for s in runs if s != "adaptive"]]
    for name in order:
        run = runs.get(name)
        if not run or run.get("infeasible"):
            continue
        lat = [r["latency_s"] for r in run["requests"]
               if r["ok"] and r["start_s"] >= warmup_s and r["end_s"] < event_times[0]]  # fmt: skip
        p50 = percentile(lat, 0.5)
        if p50 is not None:
            return SLO_FACTOR * p50, name
    return None, "none"


def settled_p95(run: dict, start_s: float, end_s: float) -> float | None:
    """p95 of the successful requests that started at or after ``start_s`` and ended before ``end_s``."""
    lat = [
        r["latency_s"] for r in run["requests"] if r["ok"] and start_s <= r["start_s"] and r["end_s"] < end_s
    ]
    return percentile(lat, 0.95)


MEASURED_CONFIRMATION = "confirmed by measurement"


def transition(run: dict, change_s: float, end_s: float) -> dict | None:
    """Where adaptation's time went after a change at ``change_s``, read off the run's decision log.

    ``seen_s``: the first look after the change that predicted a gain worth a
    change (a keep waiting for confirmation, or the change itself);
    ``rollout_s``: when the rollout began (the change's commit time less its
    rollout's duration); ``committed_s``: when it committed; all in seconds
    after the change. ``confirmed_by``: ``measurement`` (the plan's own steps
    had slowed down), ``second look`` or ``none needed`` (the plan could not
    serve). None when no change committed before ``end_s``, or the run kept
    no decision log.
    """
    events = [e for e in run.get("events") or [] if change_s <= e["t_s"] < end_s]
    change = next((e for e in events if e["kind"] in PLAN_CHANGES), None)
    if change is None:
        return None
    took = float((change.get("data") or {}).get("took_s") or 0.0)
    waiting = [e for e in events if e["kind"] == "keep" and "to see the gain again" in e["message"]
               and e["t_s"] <= change["t_s"] - took]  # fmt: skip
    rollout_s = change["t_s"] - took - change_s
    message = change["message"]
    confirmed_by = ("measurement" if MEASURED_CONFIRMATION in message else
                    "second look" if "predicted again" in message or waiting else "none needed")  # fmt: skip
    return {"seen_s": (waiting[0]["t_s"] - change_s) if waiting else rollout_s, "rollout_s": rollout_s,
            "committed_s": change["t_s"] - change_s, "rollout_took_s": took, "confirmed_by": confirmed_by,
            "kind": change["kind"]}  # fmt: skip


def first_change_comparison(
    table: dict[str, list[dict]],
    runs: dict[str, dict] | None = None,
    window: tuple[float, float] | None = None,
) -> dict | None:
    """Adaptive against static after the first event: p95 ratio, failures, requests served.

    With ``runs`` and ``window`` (the first event's time, the next one's) also the
    p95 ratio over the requests that *started* after the change, i.e. without the
    ones in flight when it landed.
    """
    a, s = table.get("adaptive"), table.get("static")
    if not a or not s or len(a) < 2 or len(s) < 2:
        return None
    a1, s1 = a[1], s[1]
    ratio = s1["p95_s"] / a1["p95_s"] if a1["p95_s"] and s1["p95_s"] else None
    out = {"static_over_adaptive_p95": ratio, "adaptive_failed": a1["failed"], "static_failed": s1["failed"],
           "adaptive_served": a1["requests"] - a1["failed"], "static_served": s1["requests"] - s1["failed"]}  # fmt: skip
    # The strategies run one after the other on a machine whose speed drifts
    # between runs by tens of per cent; each p95 over the same run's p50 before
    # the change cancels what the drift does to a whole run.
    if ratio is not None and a[0].get("p50_s") and s[0].get("p50_s"):
        out["drift_corrected_ratio"] = (s1["p95_s"] / s[0]["p50_s"]) / (a1["p95_s"] / a[0]["p50_s"])
    if runs is not None and window is not None:
        pa, ps = settled_p95(runs["adaptive"], *window), settled_p95(runs["static"], *window)
        out.update(adaptive_settled_p95_s=pa, static_settled_p95_s=ps,
                   static_over_adaptive_settled_p95=ps / pa if pa and ps else None)  # fmt: skip
        step = transition(runs["adaptive"], *window)
        if step is not None:
            out["adaptive_transition"] = step
    return out


def rounds_summary(comparisons: list[dict | None]) -> dict | None:
    """The target's figures over repeated rounds: each round's ratios, their medians, every failure.

    A round runs adaptive and static one right after the other, so its ratio
    sees less of the machine's drift than a ratio across rounds would; the
    median over rounds is what a single unlucky pair cannot decide.
    """
    rounds = [c for c in comparisons if c is not None]
    if len(rounds) < 2:
        return None
    ratios = [c["static_over_adaptive_p95"] for c in rounds]
    settled = [c.get("static_over_adaptive_settled_p95") for c in rounds]

    def median(values: list[float | None]) -> float | None:
        known = sorted(v for v in values if v is not None)
        return statistics.median(known) if len(known) == len(values) else None

    return {"rounds": len(rounds), "ratios": ratios, "settled_ratios": settled, "median_ratio": median(ratios),
            "transitions": [c.get("adaptive_transition") for c in rounds],
            "median_settled_ratio": median(settled),
            "adaptive_failed": sum(c["adaptive_failed"] for c in rounds),
            "static_failed": sum(c["static_failed"] for c in rounds)}  # fmt: skip
