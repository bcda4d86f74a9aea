"""Baseline planners, from their published rules, judged by the same cost model.

Each returns a plan exactly as its rule says, or raises
:class:`InfeasibleError` naming what the rule's plan breaks (memory, privacy,
a missing link). None of them searches beyond its rule; docs/planning.md says
how close each is to the original system.

- ``even``: vLLM pipeline parallelism (``get_pp_indices``): equal layer counts,
  the remainder to the middle/late stages, embedding with the first stage and
  head with the last, over the nodes in order (source first).
- ``memory_proportional``: exo (``allocate_layers_proportionally``): the
  fewest nodes, largest memory first, whose memory holds the model; layers in
  proportion to memory by largest remainder, at least one each.
- ``greedy_throughput``: Petals (``block_selection.choose_best_blocks``): the
  source is the client and keeps embedding and head; each node in turn serves
  as many blocks as its memory holds, on the span whose served throughput is
  least; the chain is then routed through the spans for the objective.
- ``two_way``: Neurosurgeon: one split point between the source and one
  other node, the best point and node for the objective.
"""

from __future__ import annotations

import time

import numpy as np

from edgeorch.planning.cost import evaluate, score, violations
from edgeorch.planning.errors import Cause, InfeasibleError
from edgeorch.planning.optimal import PlanResult
from edgeorch.planning.problem import Problem, Stage, merge_stages
from edgeorch.planning.relax import Constraints, Relaxer


def _finish(problem: Problem, name: str, stages: list[Stage], t0: float) -> PlanResult:
    stages = merge_stages(stages)
    broken = violations(problem, stages)
    if broken:
        raise InfeasibleError(f"the {name} rule yields an infeasible plan", broken)
    ev = evaluate(problem, stages)
    value = score(problem, ev)
    return PlanResult(tuple(stages), ev, name, False, time.monotonic() - t0, value, None, None)


def _layer_stages(nodes: list[int], counts: list[int], num_units: int) -> list[Stage]:
    """Stages giving ``counts[i]`` layers to ``nodes[i]``; embedding first, head last."""
    stages, pos = [], 1
    for node, count in zip(nodes, counts, strict=True):
        stages.append(Stage(node, pos, pos + count))
        pos += count
    stages[0] = Stage(stages[0].node, 0, stages[0].end)
    stages[-1] = Stage(stages[-1].node, stages[-1].start, num_units)
    return [s for s in stages if s.end > s.start]


def _source_first(problem: Problem, nodes: list[int]) -> list[int]:
    return sorted(nodes, key=lambda n: n != problem.source)


def vllm_partition(num_layers: int, pp_size: int) -> list[int]:
    """Layer counts per pipeline rank, as vLLM's ``get_pp_indices`` computes them."""
    counts = [num_layers // pp_size] * pp_size
    for i in range(2, num_layers % pp_size + 2):
        counts[-i] += 1
    return counts


def even(problem: Problem) -> PlanResult:
    """vLLM-style equal split over the nodes (source first, then request order)."""
    t0 = time.monotonic()
    layers = problem.num_units - 2
    order = _source_first(problem, list(range(problem.num_nodes)))
    pp = max(1, min(len(order), layers))
    counts = vllm_partition(layers, pp) if layers > 0 else [0]
    return _finish(problem, "even", _layer_stages(order[:pp], counts, problem.num_units), t0)


def allocate_proportionally(total: int, fractions: list[float]) -> list[int]:
    """exo's largest-remainder allocation with at least one layer per node."""
    n = len(fractions)
    raw = [f * total for f in fractions]
    result = [int(r) for r in raw]
    by_remainder = sorted(range(n), key=lambda i: raw[i] - result[i], reverse=True)
    for i in range(total - sum(result)):
        result[by_remainder[i]] += 1
    for i in range(n):
        if result[i] == 0:
            biggest = max(range(n), key=lambda j: result[j])
            result[biggest] -= 1
            result[i] = 1
    return result


def memory_proportional(problem: Problem) -> PlanResult:
    """exo-style: fewest nodes by memory that hold the model, layers by memory share."""
    t0 = time.monotonic()
    need = int(problem.unit_memory_bytes.sum())
    by_memory = sorted(range(problem.num_nodes), key=lambda n: -problem.memory_bytes[n])
    chosen, total = [], 0
    for n in by_memory:
        chosen.append(n)
        total += int(problem.memory_bytes[n])
        if total >= need:
            break
    layers = problem.num_units - 2
    chosen = _source_first(problem, chosen[: max(1, min(len(chosen), layers))])
    mem = [float(problem.memory_bytes[n]) for n in chosen]
    fractions = [m / sum(mem) if sum(mem) > 0 else 1 / len(mem) for m in mem]
    counts = allocate_proportionally(layers, fractions) if layers > 0 else [0] * len(chosen)
    return _finish(problem, "memory_proportional", _layer_stages(chosen, counts, problem.num_units), t0)


def _choose_best_start(throughputs: np.ndarray, num_blocks: int) -> int:
    """Petals: the span whose sorted served throughputs are lexicographically least."""
    options = (
        (sorted(throughputs[i : i + num_blocks].tolist()), i)
        for i in range(len(throughputs) - num_blocks + 1)
    )
    return min(options)[-1]


def petals_spans(problem: Problem) -> dict[int, tuple[int, int]]:
    """Each node's block span (units [a, b)), chosen in turn as Petals servers do on joining."""
    mem = problem.unit_memory_bytes
    u_count = problem.num_units
    blocks = np.arange(1, u_count - 1)
    block_mem = float(mem[blocks].mean()) if len(blocks) else 1.0
    block_flops = float(problem.flops_per_token[blocks].mean()) if len(blocks) else 1.0
    served = np.zeros(len(blocks))
    spans: dict[int, tuple[int, int]] = {}
    for n in range(problem.num_nodes):
        free = int(problem.memory_bytes[n])
        if n == problem.source:
            free -= int(mem[0] + mem[u_count - 1])  # the client keeps embedding and head
        k = min(len(blocks), int(free // block_mem)) if block_mem > 0 else len(blocks)
        while k > 0:
            start = _choose_best_start(served, k)
            if mem[1 + start : 1 + start + k].sum() <= free:
                break
            k -= 1
        if k <= 0:
            continue
        spans[n] = (1 + start, 1 + start + k)
        # A server's throughput in blocks/s: its speed over a block's work.
        served[start : start + k] += problem.flops_per_s[n] / max(block_flops, 1.0)
    return spans


def greedy_throughput(problem: Problem) -> PlanResult:
    """Petals-style block selection, then the best route through the served spans."""
    t0 = time.monotonic()
    spans = petals_spans(problem)
    u_count = problem.num_units
    covered = np.zeros(u_count, dtype=bool)
    covered[[0, u_count - 1]] = True
    for a, b in spans.values():
        covered[a:b] = True
    if not covered.all():
        missing = [int(u) for u in np.flatnonzero(~covered)]
        raise InfeasibleError(
            "the greedy_throughput rule yields an infeasible plan",
            [
                Cause(
                    "uncovered_units",
                    f"no node's memory left room to serve units {missing}",
                    units=tuple(missing),
                )
            ],
        )
    mask = np.zeros((u_count, problem.num_nodes), dtype=bool)
    for n, (a, b) in spans.items():
        mask[a:b, n] = True
    mask[[0, u_count - 1], problem.source] = True
    route = Relaxer(problem, restrict=mask).solve(Constraints())
    if route is None:
        raise InfeasibleError(
            "the greedy_throughput rule yields an infeasible plan",
            [Cause("no_route", "no chain through the served spans respects privacy and links")],
        )
    return _finish(problem, "greedy_throughput", list(route.stages), t0)


def two_way(problem: Problem) -> PlanResult:
    """Neurosurgeon: units [0, k) on the source, [k, U) on one other node; best k and node."""
    t0 = time.monotonic()
    src, u_count = problem.source, problem.num_units
    best: tuple[float, list[Stage]] | None = None
    fallback: list[Stage] | None = None
    for m in range(problem.num_nodes):
        for k in range(u_count + 1):
            if m == src and k < u_count:
                continue
            stages = [Stage(src, 0, k)] if k > 0 else []
            stages += [Stage(m, k, u_count)] if k < u_count else []
            if not _split_ok(problem, m, k):
                fallback = fallback or stages
                continue
            value = score(problem, evaluate(problem, stages))
            if best is None or value < best[0]:
                best = (value, stages)
    if best is None:
        return _finish(problem, "two_way", fallback or [Stage(src, 0, u_count)], t0)
    return _finish(problem, "two_way", best[1], t0)


def _split_ok(problem: Problem, m: int, k: int) -> bool:
    """Memory, privacy and links of the split at k to node m, without evaluating it."""
    src, u_count = problem.source, problem.num_units
    mem = problem.unit_memory_bytes
    if mem[:k].sum() > problem.memory_bytes[src] or mem[k:].sum() > problem.memory_bytes[m]:
        return False
    if not problem.allowed[:k, src].all() or not problem.allowed[k:, m].all():
        return False
    return k == u_count or (problem.has_link[src, m] and problem.has_link[m, src])


STRATEGIES = {
    "even": even,
    "memory_proportional": memory_proportional,
    "greedy_throughput": greedy_throughput,
    "two_way": two_way,
}
