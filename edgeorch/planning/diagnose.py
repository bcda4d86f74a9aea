"""Why no plan exists: causes a person (or the orchestrator) can act on.

Checked from the most specific to the most general: units that no allowed
node could ever hold, privacy with no trusted host, nodes cut off from the
source, memory totals, then links a plan would need, then memory packing.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from edgeorch.planning.bounds import packable_memory
from edgeorch.planning.errors import Cause
from edgeorch.planning.problem import Problem, Stage
from edgeorch.planning.relax import Constraints, Relaxer


def _reach(adj: np.ndarray, start: int) -> np.ndarray:
    seen = np.zeros(adj.shape[0], dtype=bool)
    seen[start] = True
    frontier = [start]
    while frontier:
        nxt = np.flatnonzero(adj[frontier].any(axis=0) & ~seen)
        seen[nxt] = True
        frontier = nxt.tolist()
    return seen


def usable_nodes(problem: Problem) -> np.ndarray:
    """Nodes on some round trip from the source (the only ones a plan can use)."""
    return _reach(problem.has_link, problem.source) & _reach(problem.has_link.T, problem.source)


def _unit_causes(p: Problem) -> list[Cause]:
    causes = []
    trusted_units = [int(u) for u in np.flatnonzero(p.trusted_mask)]
    if trusted_units and not p.trusted.any():
        causes.append(
            Cause(
                "no_trusted_host",
                f"units {trusted_units} must run on a trusted node and none is",
                units=tuple(trusted_units),
            )
        )
        return causes
    mem = p.unit_memory_bytes
    for u in range(p.num_units):
        allowed = np.flatnonzero(p.allowed[u])
        biggest = int(allowed[np.argmax(p.memory_bytes[allowed])])
        largest = int(p.memory_bytes[biggest])
        if mem[u] > largest:
            who = "trusted node" if p.trusted_mask[u] else "node"
            name = p.node_ids[biggest]
            causes.append(
                Cause(
                    "unit_too_large",
                    f"unit {u} ({p.unit_names[u]}) needs {int(mem[u])} bytes; the largest {who}, {name}, has {largest}",
                    nodes=(name,),
                    units=(u,),
                    short_by_bytes={name: int(mem[u]) - largest},
                )
            )
    return causes


def _missing_round_trip(p: Problem, nodes: np.ndarray) -> tuple[tuple[str, str], ...]:
    ids, src = p.node_ids, p.source
    links = []
    for n in np.flatnonzero(nodes):
        if not p.has_link[src, n]:
            links.append((ids[src], ids[n]))
        if not p.has_link[n, src]:
            links.append((ids[n], ids[src]))
    return tuple(links)


def _total_causes(p: Problem, usable: np.ndarray) -> list[Cause]:
    ids = p.node_ids
    causes = []
    cut_off = ~usable
    if cut_off.any():
        names = tuple(ids[n] for n in np.flatnonzero(cut_off))
        causes.append(
            Cause(
                "unreachable",
                f"nodes {list(names)} have no round trip of links from the source {ids[p.source]}",
                nodes=names,
                links=_missing_round_trip(p, cut_off),
            )
        )
    mem = p.unit_memory_bytes
    need, have = int(mem.sum()), int(p.memory_bytes[usable].sum())
    if need > have:
        causes.append(
            Cause(
                "insufficient_memory",
                f"the model needs {need} bytes, the reachable nodes have {have} (short by {need - have})",
                nodes=tuple(ids[n] for n in np.flatnonzero(usable)),
                short_by_bytes={"total": need - have},
            )
        )
    hosts = usable & p.trusted
    t_need, t_have = int(mem[p.trusted_mask].sum()), int(p.memory_bytes[hosts].sum())
    if t_need > t_have:
        short = {ids[n]: t_need - t_have for n in np.flatnonzero(hosts)} if hosts.sum() == 1 else {}
        causes.append(
            Cause(
                "trusted_memory",
                f"trusted units need {t_need} bytes, reachable trusted nodes have {t_have} (short by {t_need - t_have})",
                nodes=tuple(ids[n] for n in np.flatnonzero(hosts)),
                units=tuple(int(u) for u in np.flatnonzero(p.trusted_mask)),
                short_by_bytes=short or {"trusted_total": t_need - t_have},
            )
        )
    if cut_off.any() and len(causes) == 1:
        return []  # the cut-off nodes are not what blocks the plan
    return causes


def whole_unit_causes(p: Problem, allowed: np.ndarray) -> list[Cause]:
    """The model does not fit the nodes in whole units (each node holds only what fits entirely)."""
    packable = packable_memory(p, allowed)
    need = int(p.unit_memory_bytes.sum())
    if packable is None or packable.sum() >= need:
        return []
    have = int(packable.sum())
    holding = [p.node_ids[n] for n in np.flatnonzero(packable > 0)]
    text = (
        f"the model needs {need} bytes but whole units fill at most {have} bytes of node memory "
        f"(short by {need - have}); only {len(holding)} of {p.num_nodes} nodes can hold any unit"
    )
    return [Cause("insufficient_memory", text, nodes=tuple(holding), short_by_bytes={"total": need - have})]


def _link_causes(p: Problem) -> list[Cause]:
    """Links a plan would use if every link existed."""
    n = p.num_nodes
    full = dataclasses.replace(
        p,
        has_link=~np.eye(n, dtype=bool) | p.has_link,
        bandwidth_bytes_per_s=np.where(p.has_link, p.bandwidth_bytes_per_s, 1.0),
        objective="latency",
        migration_weight=0.0,
    )
    r = Relaxer(full)
    sol = r.solve(Constraints(forced=r.root_forced()))
    if sol is None:
        return []
    ids, src = p.node_ids, p.source
    path = [src, *[s.node for s in sol.stages], src]
    missing = tuple(
        dict.fromkeys(
            (ids[a], ids[b]) for a, b in zip(path, path[1:], strict=False) if a != b and not p.has_link[a, b]
        )
    )
    if not missing:
        return []
    text = ", ".join(f"{a}->{b}" for a, b in missing)
    return [
        Cause(
            "missing_link",
            f"every plan that fits needs a link that does not exist, e.g. {text}",
            links=missing,
        )
    ]


def packing_causes(p: Problem, stages: tuple[Stage, ...] | None) -> list[Cause]:
    """Nodes a relaxed plan overfills: memory cannot be packed onto the nodes as the chain needs."""
    if stages is None:
        n = p.num_nodes
        roomy = dataclasses.replace(p, memory_bytes=np.full(n, np.iinfo(np.int64).max // 4, dtype=np.int64))
        r = Relaxer(roomy)
        sol = r.solve(Constraints(forced=r.root_forced()))
        if sol is None:
            return []
        stages = sol.stages
    used = np.zeros(p.num_nodes, dtype=np.int64)
    for s in stages:
        used[s.node] += int(p.unit_memory_bytes[s.start : s.end].sum())
    over = {
        p.node_ids[n]: int(used[n] - p.memory_bytes[n])
        for n in range(p.num_nodes)
        if used[n] > p.memory_bytes[n]
    }
    if not over:
        return []
    text = ", ".join(f"{k} by {v} bytes" for k, v in over.items())
    return [
        Cause(
            "memory",
            f"the units cannot be packed onto the nodes that may run them; best attempt leaves {text} short",
            nodes=tuple(over),
            short_by_bytes=over,
        )
    ]


def migration_causes(problem: Problem, only_forced: bool) -> list[Cause]:
    """The migration cap as a cause: units on lost nodes that must move anyway, or the cap itself."""
    owner, cap = problem.current_owner, problem.max_migration_bytes
    if cap is None or owner is None:
        return []
    lost = [int(u) for u in np.flatnonzero(owner < 0)]
    must = int(problem.param_bytes[lost].sum())
    if must > cap:
        text = f"units {lost} were on nodes that are gone: at least {must} bytes must move, the cap is {cap}"
        return [Cause("migration_cap", text, units=tuple(lost))]
    if only_forced:
        return []
    return [
        Cause("migration_cap", f"no plan within the migration cap of {cap} bytes satisfies the constraints")
    ]


def diagnose(problem: Problem, relaxed: tuple[Stage, ...] | None = None) -> list[Cause]:
    """Causes of infeasibility, most specific first; never empty.

    ``relaxed`` is the per-stage relaxation's plan when there is one (then
    only the nodes' totals can be what blocks, and its overfull nodes say which).
    """
    checks = (
        lambda: _unit_causes(problem),
        lambda: _total_causes(problem, usable_nodes(problem)),
        lambda: whole_unit_causes(problem, problem.allowed & usable_nodes(problem)[None, :]),
        lambda: migration_causes(problem, only_forced=True),
        lambda: _link_causes(problem) if relaxed is None else [],
        lambda: packing_causes(problem, relaxed),
        lambda: migration_causes(problem, only_forced=False),
    )
    for check in checks:
        causes = check()
        if causes:
            return causes
    return [Cause("constraints", "no plan satisfies memory, privacy and links together")]
