"""Simulated nodes (edgeorch/sim) against the real control plane: monitor, splitter, broadcast,
orchestrator and a private Redis as processes, the nodes in this process."""

from __future__ import annotations

import asyncio
import inspect
import time

import httpx
import pytest

from edgeorch.local.scenario import Scenario
from edgeorch.local.stack import LocalStack
from edgeorch.sim.fleet import FleetConfig, SimFleet, make_specs
from edgeorch.sim.models import write_sim_models
from edgeorch.sim.node import SimConfig

MAX_PEERS = 3


@pytest.fixture(scope="module")
def stack(store, tmp_path_factory):
    root = tmp_path_factory.mktemp("sim-store")
    write_sim_models(root, store.root / "smollm2-135m")
    scenario = Scenario.model_construct(description="simulated nodes only", workers=[])
    with LocalStack(scenario, model_store=root, log_dir=tmp_path_factory.mktemp("sim-logs"), private_redis=True,
                    jobs_worker=False, service_env={"EDGEORCH_MAX_PEERS": str(MAX_PEERS)},
                    start_timeout_s=180) as s:  # fmt: skip
        yield s


def _fleet(stack: LocalStack) -> SimFleet:
    sim = SimConfig(stack.monitor_url, stack.broadcast_url, stack.rollout_secret)
    return SimFleet(FleetConfig(sim, stack.redis_url))


async def _until(check, timeout_s: float, every_s: float = 0.2):
    """Poll ``check`` (a function, sync or async) until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(every_s)
    raise AssertionError(f"condition not met within {timeout_s}s")


def test_simulated_nodes_register_heartbeat_and_get_ring_peers(stack) -> None:
    async def run() -> None:
        fleet = _fleet(stack)
        await fleet.start()
        specs = make_specs(6, seed=1, prefix="ring")
        try:
            for s in specs:
                await fleet.add(s)
            async with httpx.AsyncClient(timeout=10) as c:

                async def all_alive():
                    nodes = (await c.get(f"{stack.monitor_url}/v1/nodes", params={"state": "alive"})).json()
                    mine = {n["node_id"]: n for n in nodes if n["node_id"].startswith("ring-")}
                    return mine if len(mine) == 6 else None

                nodes = await _until(all_alive, 20)
                assert nodes["ring-0000"]["memory_bytes"] == specs[0].memory_bytes
                assert nodes["ring-0000"]["url"] == fleet.url("ring-0000")
                # Each node is given MAX_PEERS peers (not all five others) and reports links to them.
                await _until(lambda: all(len(n.state.peers) == MAX_PEERS for n in fleet.nodes.values()), 10)

                async def ring_links():
                    links = (await c.get(f"{stack.monitor_url}/v1/links")).json()
                    mine = [lk for lk in links if lk["src"].startswith("ring-")]
                    pairs = {(lk["src"], lk["dst"]) for lk in mine}
                    wanted = {(n, p) for n, node in fleet.nodes.items() for p in node.state.peers}
                    return mine if wanted <= pairs else None

                # Links to the peers of one reply arrive with the next heartbeat (links to the peers
                # a node had while the fleet was smaller stay on record: they were measured).
                mine = await _until(ring_links, 10)
                a, b = mine[0]["src"], mine[0]["dst"]
                assert mine[0]["rtt_s"] == pytest.approx(fleet.link(a, b)[0])
                assert all(b.ok for b in fleet.beats[-20:])
                # A silent node is declared lost by the monitor on its own clock.
                await fleet.remove("ring-0003")
                await _until(lambda: _lost(c, stack, "ring-0003"), 10)
        finally:
            await fleet.stop()

    asyncio.run(run())


async def _lost(c: httpx.AsyncClient, stack: LocalStack, node: str) -> bool:
    return (await c.get(f"{stack.monitor_url}/v1/nodes/{node}")).json()["state"] == "lost"


def test_a_deployment_is_rolled_out_to_simulated_nodes_and_replanned_when_one_is_lost(stack) -> None:
    async def run() -> None:
        fleet = _fleet(stack)
        await fleet.start()
        headers = {"authorization": f"Bearer {stack.admin_token}"}
        try:
            for s in make_specs(6, seed=2, prefix="dep"):
                await fleet.add(s)
            async with httpx.AsyncClient(timeout=30, headers=headers) as c:
                url = f"{stack.orchestrator_url}/v1/deployments"
                policy = {"weight_format": "int8", "nodes": sorted(fleet.specs)}
                resp = await c.post(url, json={"name": "sim32", "model": "sim-llama-32", "policy": policy})
                assert resp.status_code == 201, resp.text

                async def deployed(after: int = 0):
                    view = (await c.get(f"{url}/sim32")).json()
                    return view if (view["version"] or 0) > after and view["state"] == "ready" else None

                view = await _until(deployed, 60)
                nodes = {s["node"] for s in view["stages"]}
                assert nodes <= set(fleet.specs)
                # Every stage of the committed plan is held by the node it was placed on.
                for s in view["stages"]:
                    held = fleet.nodes[s["node"]].state.stages
                    assert any(sid.startswith(f"sim32.v{view['version']}.") for sid in held), (s, held)
                gone = sorted(nodes)[0]
                await fleet.remove(gone)
                view2 = await _until(lambda: deployed(view["version"]), 60)
                assert gone not in {s["node"] for s in view2["stages"]}
        finally:
            await fleet.stop()

    asyncio.run(run())
