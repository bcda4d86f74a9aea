"""Activation formats per hop: what each sends, what it costs, which one a link should carry.

Pure functions, no torch: the controller chooses a format for every hop of
a plan from the measured bandwidth of its link, and the cost model
(:func:`edgeorch.planning.cost.evaluate` with ``formats``) charges each hop
the bytes its format sends plus the time to convert (pack at the sender,
restore at the receiver). The encodings themselves are
``edgeorch.transport.compression``.

A lossy format costs answer quality, so it must earn its place twice:

- its measured quality cost (:data:`TOP1_LOSS_PER_HOP`, the share of greedy
  tokens that differ from fp32 hops, per compressed hop) must fit the
  deployment's ``quality_budget`` summed over every compressed hop of the
  chain, and
- the time it saves on that hop must be at least ``min_gain`` of the plan's
  whole predicted latency: a fast link keeps fp32, whatever the share of
  its own (tiny) hop time a format would save.

When the budget cannot pay for every hop that would gain, the hops that save
the most seconds are compressed first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ACTIVATION_FORMATS: tuple[str, ...] = ("fp32", "bf16", "int8")
# Channels per token sent exactly beside the int8 body. The residual stream of
# Llama-style models has a few channels hundreds of times larger than the rest;
# with them in the scale, every other channel would keep only a few levels.
OUTLIERS = 8
# Conversion cost per element (pack at the sender plus restore at the receiver),
# measured with one torch thread on the loaded 2-core dev VM (bench/activation_quality.py,
# docs/results.md: 0.7 and 83 ns), rounded up: int8's top-k of outliers dominates it.
CONVERT_S_PER_ELEMENT: dict[str, float] = {"fp32": 0.0, "bf16": 1.0e-9, "int8": 1.0e-7}
# Quality cost per compressed hop: the share of greedy next tokens that differ
# from all-fp32 hops. Measured on SmolLM2-135M over bench/data/quality_text.txt
# with 2 compressed hops (bench/activation_quality.py): int8 0.9971 top-1
# agreement (0.0029 / 2 hops); bf16 1.000 (no token of 700 differed, charged as
# if one had: 1/700 / 2 hops). Used for every model until one is measured.
TOP1_LOSS_PER_HOP: dict[str, float] = {"fp32": 0.0, "bf16": 0.0007, "int8": 0.00145}
DEFAULT_QUALITY_BUDGET = 0.01  # top-1 agreement >= 0.99 over the chain (issue 21's budget)
# A hop is compressed only if it saves this share of the plan's latency: a fast link's
# microseconds are never worth any quality. The whole change must then also pass the
# orchestrator's threshold for a format change (QosPolicy.compress_min_gain).
DEFAULT_MIN_GAIN = 0.02


def bytes_per_token(fmt: str, hidden: int) -> int:
    """Bytes one token's hidden state takes on a hop in ``fmt``."""
    return {"fp32": 4 * hidden, "bf16": 2 * hidden, "int8": hidden + 4 + 8 * min(OUTLIERS, hidden)}[fmt]


def convert_s_per_token(fmt: str, hidden: int) -> float:
    """Seconds to pack and restore one token's hidden state in ``fmt``."""
    return hidden * CONVERT_S_PER_ELEMENT[fmt]


def hop_seconds(fmt: str, tokens: int, hidden: int, bandwidth_bytes_per_s: float) -> float:
    """Predicted time to send ``tokens`` hidden states in ``fmt``: transfer plus conversion."""
    return tokens * (bytes_per_token(fmt, hidden) / bandwidth_bytes_per_s + convert_s_per_token(fmt, hidden))


def choose_format(
    tokens: int,
    hidden: int,
    bandwidth_bytes_per_s: float,
    allowed: Iterable[str] = ACTIVATION_FORMATS,
    min_gain: float = 0.2,
) -> str:
    """One link alone: the fastest allowed format, if it saves ``min_gain`` of fp32's hop time.

    :func:`choose_hop_formats` is the plan-wide choice the controller makes;
    this is the single-link rule, kept for callers without a plan.
    """
    fp32_s = hop_seconds("fp32", tokens, hidden, bandwidth_bytes_per_s)
    best = min(allowed, key=lambda f: hop_seconds(f, tokens, hidden, bandwidth_bytes_per_s))
    if best != "fp32" and hop_seconds(best, tokens, hidden, bandwidth_bytes_per_s) <= (1 - min_gain) * fp32_s:
        return best
    return "fp32"


@dataclass(frozen=True)
class HopLink:
    """One activation hop of a plan: into the stage starting at unit ``boundary``, over a link."""

    boundary: int
    hidden: int  # float32 elements per token (the hop's fp32 bytes / 4)
    bandwidth_bytes_per_s: float


def choose_hop_formats(
    hops: Iterable[HopLink],
    tokens: int,
    latency_s: float,
    allowed: Iterable[str] = ACTIVATION_FORMATS,
    quality_budget: float = DEFAULT_QUALITY_BUDGET,
    min_gain: float = DEFAULT_MIN_GAIN,
    current: Mapping[int, str] | None = None,
) -> dict[int, str]:
    r"""The format of every activation hop (keyed by boundary unit) for a plan of fp32 latency ``latency_s``.

    ``tokens``: tokens a request sends over each hop (prompt + generated).
    A hop gets its fastest allowed lossy format when that saves at least
    ``min_gain × latency_s`` and its quality cost still fits the budget;
    hops saving the most go first. Every other hop stays fp32. A hop that
    ``current``\ ly carries a format keeps it while it saves half that
    (hysteresis: speeds measured on a busy host swing the predicted latency,
    and a hop must not flip between two formats with them).
    """
    allowed = [f for f in allowed if f in ACTIVATION_FORMATS]
    hops = list(hops)
    out = {h.boundary: "fp32" for h in hops}
    offers = []
    for h in hops:
        fp32_s = hop_seconds("fp32", tokens, h.hidden, h.bandwidth_bytes_per_s)
        for f in allowed:
            if f == "fp32" or TOP1_LOSS_PER_HOP[f] > quality_budget:
                continue
            saving = fp32_s - hop_seconds(f, tokens, h.hidden, h.bandwidth_bytes_per_s)
            need = min_gain / 2 if current and current.get(h.boundary) == f else min_gain
            if saving > 0 and saving >= need * latency_s:
                offers.append((saving, -TOP1_LOSS_PER_HOP[f], h.boundary, f))
    spent = 0.0
    for _saving, neg_loss, boundary, f in sorted(offers, reverse=True):
        if out[boundary] != "fp32" or spent - neg_loss > quality_budget + 1e-12:
            continue
        out[boundary] = f
        spent -= neg_loss
    return out


def quality_loss(formats: Mapping[int, str] | Iterable[str]) -> float:
    """Predicted share of greedy tokens that differ from fp32 hops, summed over the compressed hops."""
    values = formats.values() if isinstance(formats, Mapping) else formats
    return sum(TOP1_LOSS_PER_HOP[f] for f in values)
