"""Brute-force oracle for the planner: every plan of a small instance, evaluated plainly.

Deliberately shares no code with ``edgeorch.planning``. An instance is a plain
dict (see ``random_instance``); a plan is a unit→node-index assignment, and
every assignment of the U units to the N nodes is a distinct plan once
consecutive units on the same node are read as one stage. That is exactly the
space DESIGN.md §3 allows, a node hosting any number of stages included.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np

Instance = dict[str, Any]


def unit_memory(inst: Instance) -> list[int]:
    """Weights plus KV cache of each unit, KV rounded up to whole bytes."""
    w = inst["workload"]
    ctx = w["context_tokens"] * w["max_sessions"]
    return [p + math.ceil(k * ctx) for p, k in zip(inst["param_bytes"], inst["kv_bytes"], strict=True)]


def evaluate_one(inst: Instance, assign: list[int]) -> dict[str, Any]:
    """One plan, in plain Python loops: feasibility, latency, throughput bottleneck, energy."""
    w = inst["workload"]
    tokens, gen = w["prompt_tokens"] + w["generated_tokens"], w["generated_tokens"]
    src, links = inst["source"], inst["links"]
    nodes = inst["nodes"]
    u_count = len(assign)
    feasible = True
    latency = energy = 0.0
    node_load = [0.0] * len(nodes)
    node_mem = [0] * len(nodes)
    for u, n in enumerate(assign):
        seconds = tokens * inst["flops"][u] / nodes[n]["fps"]
        latency += seconds
        energy += seconds * nodes[n]["watts"]
        node_load[n] += inst["flops"][u] / nodes[n]["fps"]
        node_mem[n] += unit_memory(inst)[u]
        if u in inst["trusted_units"] and not nodes[n]["trusted"]:
            feasible = False
    link_load: dict[tuple[int, int], float] = {}
    hops = [(src, assign[0], inst["input_bytes"])]
    hops += [(assign[u - 1], assign[u], inst["out_bytes"][u - 1]) for u in range(1, u_count)]
    hops.append((assign[-1], src, inst["result_bytes"]))
    for a, b, nbytes in hops:
        if a == b:
            continue
        if (a, b) not in links:
            feasible = False
            continue
        bw, rtt = links[(a, b)]
        latency += (1 + gen) * rtt / 2 + tokens * nbytes / bw
        link_load[(a, b)] = link_load.get((a, b), 0.0) + nbytes / bw
    for n, node in enumerate(nodes):
        if node_mem[n] > node["memory"]:
            feasible = False
    moved = 0
    if inst.get("owner") is not None:
        moved = sum(p for u, p in enumerate(inst["param_bytes"]) if assign[u] != inst["owner"][u])
        if inst.get("cap") is not None and moved > inst["cap"]:
            feasible = False
    bottleneck = max([0.0, *node_load, *link_load.values()])
    return {
        "feasible": feasible,
        "latency": latency,
        "energy": energy,
        "bottleneck": bottleneck,
        "moved": moved,
        "node_mem": node_mem,
    }


def _all_assignments(n_nodes: int, n_units: int) -> np.ndarray:
    idx = np.arange(n_nodes**n_units)
    cols = [(idx // n_nodes ** (n_units - 1 - j)) % n_nodes for j in range(n_units)]
    return np.stack(cols, axis=1)


def _hops(inst: Instance, a: np.ndarray) -> tuple[np.ndarray, dict, np.ndarray]:
    """Per assignment: total hop time, per-link load, and whether every hop has a link."""
    w = inst["workload"]
    tokens, gen = w["prompt_tokens"] + w["generated_tokens"], w["generated_tokens"]
    n_nodes, src = len(inst["nodes"]), inst["source"]
    prev = np.concatenate([np.full((len(a), 1), src), a], axis=1)
    nxt = np.concatenate([a, np.full((len(a), 1), src)], axis=1)
    carried = [inst["input_bytes"], *inst["out_bytes"][: a.shape[1] - 1], inst["result_bytes"]]
    seconds, linked, loads = np.zeros(len(a)), np.ones(len(a), dtype=bool), {}
    for j, nbytes in enumerate(carried):
        for m in range(n_nodes):
            for n in range(n_nodes):
                hop = (prev[:, j] == m) & (nxt[:, j] == n)
                if m == n or not hop.any():
                    continue
                if (m, n) not in inst["links"]:
                    linked &= ~hop
                    continue
                bw, rtt = inst["links"][(m, n)]
                seconds = seconds + hop * ((1 + gen) * rtt / 2 + tokens * nbytes / bw)
                loads[(m, n)] = loads.get((m, n), 0.0) + hop * (nbytes / bw)
    return seconds, loads, linked


def brute_force(inst: Instance) -> dict[str, Any]:
    """Every assignment evaluated at once; the least score per objective among feasible ones.

    Returns ``{"feasible_count", "latency", "throughput", "energy"}``; each
    objective maps to the least score (latency + weight·moved bytes, the
    bottleneck in s/token, energy + weight·moved bytes) or None.
    """
    nodes = inst["nodes"]
    n_nodes, n_units = len(nodes), len(inst["flops"])
    w = inst["workload"]
    tokens = w["prompt_tokens"] + w["generated_tokens"]
    a = _all_assignments(n_nodes, n_units)
    fps = np.array([n["fps"] for n in nodes])
    watts = np.array([n["watts"] for n in nodes])
    trusted = np.array([n["trusted"] for n in nodes])
    flops = np.array(inst["flops"], dtype=float)
    unit_s = tokens * flops[None, :] / fps[a]
    latency = unit_s.sum(axis=1)
    energy = (unit_s * watts[a]).sum(axis=1)
    ok = np.ones(len(a), dtype=bool)
    for u in inst["trusted_units"]:
        ok &= trusted[a[:, u]]
    mem = np.array(unit_memory(inst), dtype=np.int64)
    loads = []
    for n in range(n_nodes):
        on = a == n
        ok &= (on * mem[None, :]).sum(axis=1) <= nodes[n]["memory"]
        loads.append((on * (flops / fps[n])[None, :]).sum(axis=1))
    hop_s, link_loads, linked = _hops(inst, a)
    latency = latency + hop_s
    ok &= linked
    bottleneck = np.max(np.stack([np.zeros(len(a)), *loads, *link_loads.values()]), axis=0)
    moved = np.zeros(len(a))
    if inst.get("owner") is not None:
        owner = np.array(inst["owner"])
        moved = ((a != owner[None, :]) * np.array(inst["param_bytes"], dtype=float)[None, :]).sum(axis=1)
        if inst.get("cap") is not None:
            ok &= moved <= inst["cap"]
    weight = inst.get("weight", 0.0)
    result: dict[str, Any] = {"feasible_count": int(ok.sum())}
    for name, values in (
        ("latency", latency + weight * moved),
        ("energy", energy + weight * moved),
        ("throughput", bottleneck),
    ):
        result[name] = float(values[ok].min()) if ok.any() else None
    return result


def random_instance(rng: random.Random) -> Instance:
    """A small random instance: tight memory, untrusted nodes, missing links mixed in."""
    n_nodes = rng.randint(1, 5)
    n_units = rng.randint(2, 8)
    params = [
        rng.choice([0, rng.randint(1, 1000)]) if u in (0, n_units - 1) else rng.randint(50, 1000)
        for u in range(n_units)
    ]
    kv = [0.0 if rng.random() < 0.3 else rng.uniform(0.0, 0.05) for _ in range(n_units)]
    workload = {
        "prompt_tokens": rng.randint(0, 64),
        "generated_tokens": rng.randint(1, 64),
        "max_sessions": rng.randint(1, 4),
        "context_tokens": rng.randint(0, 256),
    }
    inst: Instance = {
        "param_bytes": params,
        "kv_bytes": kv,
        "flops": [0.0 if rng.random() < 0.1 else rng.uniform(1e6, 1e8) for _ in range(n_units)],
        "out_bytes": [rng.uniform(1, 1e4) for _ in range(n_units)],
        "input_bytes": 4.0,
        "result_bytes": 4.0,
        "workload": workload,
    }
    total = sum(unit_memory(inst))
    nodes = []
    for _ in range(n_nodes):
        nodes.append(
            {
                "memory": int(total * rng.uniform(0.15, 1.1)),
                "fps": rng.uniform(1e9, 2e10),
                "trusted": rng.random() < 0.5,
                "watts": rng.uniform(1, 50),
            }
        )
    inst["nodes"] = nodes
    inst["source"] = rng.randrange(n_nodes)
    inst["links"] = {
        (m, n): (rng.uniform(1e5, 1e8), rng.uniform(0, 0.01))
        for m in range(n_nodes)
        for n in range(n_nodes)
        if m != n and rng.random() < 0.8
    }
    inst["trusted_units"] = sorted(u for u in range(n_units) if rng.random() < 0.15)
    if rng.random() < 0.3:
        inst["owner"] = [rng.randrange(n_nodes) for _ in range(n_units)]
        inst["owner"] = _contiguous_owner(inst["owner"], rng)
        if rng.random() < 0.5:
            inst["cap"] = int(sum(params) * rng.uniform(0.0, 0.8))
        else:
            inst["weight"] = rng.choice([1e-6, 1e-4, 1e-2])
    return inst


def _contiguous_owner(owner: list[int], rng: random.Random) -> list[int]:
    """Any assignment is a valid current plan; sometimes a block of it sat on a node now gone (-1)."""
    if rng.random() < 0.3:
        a = rng.randrange(len(owner))
        b = rng.randrange(a, len(owner)) + 1
        owner[a:b] = [-1] * (b - a)
    return owner
