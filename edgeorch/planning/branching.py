"""Literals of the branch and bound and how they tighten a branch's constraints.

A literal is a choice a plan may or may not make: ``("on", unit, node)``,
``("hop", boundary, src, dst)`` (a hop over that link at that unit
boundary; boundary 0 is the entry, U the exit) or ``("move", unit, owner)``
(the unit leaves the node that holds it now). When the relaxed plan makes a
set of choices that no acceptable plan can make all at once, the children
"the first i-1 hold, the i-th does not" split the branch without overlap.
"""

from __future__ import annotations

from collections.abc import Iterable

from edgeorch.planning.relax import Constraints

Literal = tuple


def _effects(lit: Literal, holds: bool, num_units: int) -> tuple[list, list, set, set]:
    """(units to force, units to forbid, hops to forbid, units that must move) for a literal."""
    places: list[tuple[int, int]] = []
    bans: list[tuple[int, int]] = []
    hops: set[tuple[int, int, int]] = set()
    must: set[int] = set()
    if lit[0] == "on":
        (places if holds else bans).append((lit[1], lit[2]))
    elif lit[0] == "move":
        if holds:
            bans.append((lit[1], lit[2]))
            must.add(lit[1])
        else:
            places.append((lit[1], lit[2]))
    else:
        _, k, m, n = lit
        if holds:
            places += [(k - 1, m)] if k > 0 else []
            places += [(k, n)] if k < num_units else []
        elif k == 0:
            bans.append((0, n))  # no entry hop into n: unit 0 is not on n
        elif k == num_units:
            bans.append((num_units - 1, m))  # no exit hop from m: the last unit is not on m
        else:
            hops.add((k, m, n))
    return places, bans, hops, must


def apply_literal(cons: Constraints, lit: Literal, holds: bool, num_units: int) -> Constraints | None:
    """``cons`` plus the literal (or its negation); None if that contradicts ``cons``."""
    places, bans, hops, must = _effects(lit, holds, num_units)
    forced, forbidden = set(cons.forced), set(cons.forbidden)
    for u, node in places:
        if (u, node) in forbidden or any(f[0] == u and f[1] != node for f in forced):
            return None
        forced.add((u, node))
    for u, node in bans:
        if (u, node) in forced:
            return None
        forbidden.add((u, node))
    return Constraints(
        frozenset(forced),
        frozenset(forbidden),
        cons.forbidden_hops | hops,
        cons.must_move | must,
        cons.budgets,
    )


def children(cons: Constraints, num_units: int, lits: list[Literal]) -> Iterable[Constraints]:
    """Child i: literals before i hold, literal i does not (a partition of ``cons``)."""
    prefix: Constraints | None = cons
    for lit in lits:
        if prefix is None:
            return
        child = apply_literal(prefix, lit, False, num_units)
        if child is not None:
            yield child
        prefix = apply_literal(prefix, lit, True, num_units)
