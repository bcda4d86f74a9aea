"""The packing bounds and the plans that realise them, against the brute-force oracle.

The packing bounds are what lets the planner stop without branching, so they
must never exceed the true optimum: checked on random small instances against
exhaustive search (which shares no code with the planner). The energy packing
is also exact where every link exists, and on generated bench clusters a
realised plan attains the bound, so the answer is proven with no search.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from bench.planner import make_cluster
from edgeorch.planning import plan_optimal
from edgeorch.planning.optimal import _hop_loads
from edgeorch.planning.packing import build_packer, hop_roles, packed_energy, packed_throughput
from edgeorch.planning.realise import hamiltonian_path
from edgeorch.planning.relax import Relaxer
from tests.unit.planning.oracle import Instance, brute_force, random_instance
from tests.unit.planning.test_oracle import to_problem

INSTANCES = 200
SEED = 20_261_201
RTOL = 1e-9


@pytest.fixture(scope="module")
def solved() -> list[tuple[Instance, dict]]:
    """Random small instances with their exhaustive optima."""
    rng = random.Random(SEED)
    return [(inst, brute_force(inst)) for inst in (random_instance(rng) for _ in range(INSTANCES))]


def _full_mesh(inst: Instance) -> bool:
    n = len(inst["nodes"])
    return len(inst["links"]) == n * (n - 1)


def _packed(inst: dict, objective: str):
    """The instance as a problem, its relaxation and its packer (None when too large to build)."""
    problem = to_problem(inst, objective)
    relaxer = Relaxer(problem)
    return problem, relaxer, build_packer(problem, relaxer.base_allowed)


def test_energy_packing_never_exceeds_the_optimum_and_is_exact_on_a_full_mesh(solved) -> None:
    # The optimum includes migration_weight x moved bytes, which the packing charges too.
    checked = exact = weighted = 0
    for inst, ref in solved:
        problem, _, packer = _packed(inst, "energy")
        if packer is None or ref["energy"] is None:
            continue
        bound = packed_energy(problem, packer)
        checked += 1
        weighted += problem.migration_weight > 0
        assert bound.value <= ref["energy"] * (1 + RTOL) + 1e-15
        plain = inst.get("owner") is None and inst.get("cap") is None and not inst.get("weight")
        if plain and _full_mesh(inst):
            # Any unit→node assignment is a plan when every link exists: the packing is the problem.
            assert bound.value == pytest.approx(ref["energy"], rel=1e-9)
            exact += 1
    assert checked >= INSTANCES // 3
    assert exact >= 5
    assert weighted >= 5


def test_migration_weight_raises_the_energy_packing() -> None:
    rng = random.Random(SEED)
    weighted = raised = 0
    for inst in (random_instance(rng) for _ in range(INSTANCES)):
        problem = to_problem(inst, "energy")
        packer = build_packer(problem, Relaxer(problem).base_allowed)
        if packer is None or not problem.migration_weight:
            continue
        plain = packed_energy(dataclasses.replace(problem, migration_weight=0.0), packer).value
        weighted += 1
        raised += packed_energy(problem, packer).value > plain * (1 + RTOL)
    assert weighted >= 10 and raised >= weighted // 3


def test_throughput_packing_never_exceeds_the_optimum(solved) -> None:
    checked = tight = 0
    for inst, ref in solved:
        problem, relaxer, packer = _packed(inst, "throughput")
        if packer is None or ref["throughput"] is None:
            continue
        bound = packed_throughput(problem, packer, 0.0, hops=_hop_loads(relaxer))
        checked += 1
        assert bound.value <= ref["throughput"] * (1 + RTOL) + 1e-300
        tight += bound.value >= ref["throughput"] * (1 - RTOL)
    assert checked >= INSTANCES // 3
    assert tight >= checked // 4  # the hop rules make it tight often, not just valid


def test_the_packing_found_fits_and_places_every_unit(solved) -> None:
    for inst, ref in solved[:80]:
        problem = to_problem(inst, "energy")
        relaxer = Relaxer(problem)
        packer = build_packer(problem, relaxer.base_allowed)
        if packer is None or ref["energy"] is None:
            continue
        bound = packed_energy(problem, packer)
        assert bound.take is not None
        assert bound.take.sum(axis=0).tolist() == packer.counts.tolist()
        per_flop = problem.workload.tokens * problem.watts / problem.flops_per_s
        reps = [int(np.flatnonzero(packer.unit_class == c)[0]) for c in range(packer.counts.size)]
        flops = bound.take @ problem.flops_per_token[reps]
        memory = bound.take @ problem.unit_memory_bytes[reps]
        assert (memory <= problem.memory_bytes).all()
        if not problem.migration_weight and problem.max_migration_bytes is None:
            # Else the value also charges (or prices) the bytes that must move.
            assert float(flops @ per_flop) == pytest.approx(bound.value, rel=1e-9)


def test_hop_rules_only_ever_remove_vectors() -> None:
    problem = make_cluster(random.Random(16_001), 16, 32, "throughput")
    relaxer = Relaxer(problem)
    packer = build_packer(problem, relaxer.base_allowed)
    assert packer is not None
    hops = _hop_loads(relaxer)
    for t in (1e-5, 1e-4, 1e-3):
        ok = packer.fits.copy()
        kept = hop_roles(packer, ok, hops, t)
        assert not (kept & ~ok).any()
        assert kept[:, 0].all()  # taking nothing is always allowed


def test_hamiltonian_path_through_every_node() -> None:
    adj = np.zeros((5, 5), dtype=bool)
    for a, b in [(0, 1), (1, 2), (2, 3), (3, 0), (0, 4), (4, 1)]:
        adj[a, b] = True
    assert hamiltonian_path(adj, [0, 1, 2, 3], 0, 3, 100) == [0, 1, 2, 3]
    assert hamiltonian_path(adj, [0, 1, 2, 3], 0, 0, 100) == [0, 1, 2, 3, 0]  # a cycle
    assert hamiltonian_path(adj, [0, 4, 1, 2], 0, 2, 100) == [0, 4, 1, 2]
    assert hamiltonian_path(adj, [0, 2], 0, 2, 100) is None  # no link 0→2
    assert hamiltonian_path(adj, [3], 3, 3, 100) == [3]
    assert hamiltonian_path(adj, [0, 1, 2, 3], 0, 3, 0) is None  # out of steps


@pytest.mark.parametrize("objective", ["throughput", "energy"])
def test_bench_clusters_are_proven_by_a_realised_packing(objective: str) -> None:
    for seed in range(5):
        problem = make_cluster(random.Random(16_000 + seed), 16, 32, objective)
        result = plan_optimal(problem)
        assert result.optimal and result.gap == 0.0
        assert result.nodes_explored == 0  # no branching: the bound was attained
        assert result.solver == "packing+ordered-dp"


@pytest.mark.parametrize("objective", ["throughput", "energy"])
def test_a_zero_migration_cap_proves_the_current_plan(objective: str) -> None:
    # The current plan was made for a cluster whose fastest node was 4x slower.
    problem = make_cluster(random.Random(16_001), 16, 32, objective)
    slowed = problem.flops_per_s.copy()
    slowed[int(np.argmax(slowed))] /= 4
    before = plan_optimal(dataclasses.replace(problem, flops_per_s=slowed))
    current = tuple((problem.node_ids[s.node], s.start, s.end) for s in before.stages)
    result = plan_optimal(dataclasses.replace(problem, current_stages=current, max_migration_bytes=0))
    assert result.optimal and result.gap == 0.0
    assert result.evaluation.migration_bytes == 0
    assert result.nodes_explored == 0
