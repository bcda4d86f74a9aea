"""Many simulated nodes in one process: one HTTP server, one Redis subscription, one link model.

Every node's URL is ``http://HOST:PORT/n/<node_id>``: the control plane only
ever appends paths to a worker's URL (``/healthz``, ``/v1/stages/{id}``,
``/v1/probe/sink``), so a path prefix per node multiplexes a thousand nodes
on one port. Rollout notifications come once per process from Redis and are
verified once, then wake every running node, exactly as each worker's own
subscription would.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgeorch.rollout.signing import MessageVerifier, addressed_to
from edgeorch.service import bus
from edgeorch.sim.node import BeatRecord, SimConfig, SimNode, SimNodeSpec

log = logging.getLogger(__name__)

GB = 1 << 30


def make_specs(count: int, seed: int = 0, prefix: str = "sim", start: int = 0) -> list[SimNodeSpec]:
    """A varied edge fleet: 4-16 GB, 2-20 GFLOP/s decode, a fifth trusted, 1-10 ms and 10-125 MB/s uplinks."""
    rng = random.Random(seed * 1_000_003 + start)
    return [
        SimNodeSpec(
            node_id=f"{prefix}-{i:04d}",
            memory_bytes=rng.choice((4, 8, 8, 16)) * GB,
            decode_flops_per_s=rng.uniform(2e9, 2e10),
            cores=rng.choice((2, 4, 8)),
            trusted=rng.random() < 0.2,
            watts=rng.uniform(5.0, 30.0),
            uplink_rtt_s=rng.uniform(0.0005, 0.005),
            uplink_bytes_per_s=rng.uniform(10e6, 125e6),
            prepare_s=rng.uniform(0.1, 0.5),
        )
        for i in range(start, start + count)
    ]


@dataclass
class FleetConfig:
    """Where the fleet listens and the protocol settings every node shares."""

    sim: SimConfig
    redis_url: str
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free one


class SimFleet:
    """Runs simulated nodes; ``add``, ``remove`` and ``slow`` are the benchmark's levers."""

    def __init__(self, cfg: FleetConfig):
        self.cfg = cfg
        self.nodes: dict[str, SimNode] = {}
        self.specs: dict[str, SimNodeSpec] = {}
        self.beats: list[BeatRecord] = []
        self.notifications = 0
        self._verifier = MessageVerifier(cfg.sim.secret)
        self._server: uvicorn.Server | None = None
        self._tasks: list[asyncio.Task] = []
        self.port = cfg.port

    def url(self, node_id: str) -> str:
        """The URL a node registers under."""
        return f"http://{self.cfg.host}:{self.port}/n/{node_id}"

    async def start(self) -> None:
        """Start the shared HTTP server and the Redis subscription."""
        if not self.port:
            from edgeorch.local.launcher import free_port

            self.port = free_port()
        config = uvicorn.Config(self._app(), host=self.cfg.host, port=self.port, log_level="warning",
                                lifespan="off", access_log=False, backlog=4096)  # fmt: skip
        self._server = uvicorn.Server(config)
        self._tasks.append(asyncio.create_task(self._server.serve()))
        while not self._server.started:
            await asyncio.sleep(0.02)
        self._tasks.append(asyncio.create_task(self._follow_rollouts()))

    async def stop(self) -> None:
        """Stop every node, the subscription and the server."""
        await asyncio.gather(*(n.stop() for n in self.nodes.values()))
        if self._server is not None:
            # Forced: the control plane's clients hold keep-alive connections the server would wait on.
            self._server.should_exit = self._server.force_exit = True
        for t in self._tasks[1:]:
            t.cancel()
        _, pending = await asyncio.wait(self._tasks, timeout=5.0)
        for t in pending:
            t.cancel()

    async def add(self, spec: SimNodeSpec) -> SimNode:
        """Start a node (a join, or a return under a known id)."""
        node = SimNode(spec, self.cfg.sim, self.url(spec.node_id), self.link, self.beats)
        self.nodes[spec.node_id], self.specs[spec.node_id] = node, spec
        await node.start()
        return node

    async def remove(self, node_id: str) -> None:
        """Silence a node: it stops heartbeating and its routes answer 503 (a crash or a leave)."""
        node = self.nodes.pop(node_id)
        await node.stop()

    def slow(self, node_id: str, factor: float) -> None:
        """The node now runs ``factor`` times slower (1.0 restores it)."""
        self.nodes[node_id].state.slowdown = factor

    def link(self, src: str, dst: str) -> tuple[float, float] | None:
        """(rtt_s, bytes/s) of src→dst: both uplinks' delays, the slower uplink's bandwidth."""
        a, b = self.specs.get(src), self.specs.get(dst)
        if a is None or b is None:
            return None
        return a.uplink_rtt_s + b.uplink_rtt_s, min(a.uplink_bytes_per_s, b.uplink_bytes_per_s)

    # ----- the shared server ---------------------------------------------------------------

    def _node(self, request: Request) -> SimNode | None:
        node = self.nodes.get(request.path_params["node_id"])
        return node if node is not None and node.running and node.state.healthy else None

    def _app(self) -> Starlette:
        async def healthz(request: Request) -> Response:
            node = self._node(request)
            return JSONResponse({"status": "ok"}) if node else JSONResponse({"detail": "down"}, 503)

        async def stage(request: Request) -> Response:
            node = self._node(request)
            sid = request.path_params["stage_id"]
            if node is None:
                return JSONResponse({"detail": "down"}, 503)
            if sid not in node.state.stages:
                return JSONResponse({"detail": f"no stage {sid!r}"}, 404)
            return JSONResponse({"stage_id": sid, "sessions": 0})

        async def sink(request: Request) -> Response:
            await request.body()
            return Response(status_code=204) if self._node(request) else JSONResponse({"detail": "down"}, 503)

        return Starlette(routes=[
            Route("/n/{node_id}/healthz", healthz),
            Route("/n/{node_id}/v1/stages/{stage_id}", stage),
            Route("/n/{node_id}/v1/probe/sink", sink, methods=["POST"]),
        ])  # fmt: skip

    # ----- notifications --------------------------------------------------------------------

    def on_message(self, data: bytes | str) -> bool:
        """Verify one rollout notification; wake the running nodes it concerns when it passes."""
        import json

        try:
            msg = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        problem = self._verifier.check_message(msg)
        if problem is not None:
            log.warning("rejected rollout message: %s", problem)
            return False
        self.notifications += 1
        for node_id, node in self.nodes.items():
            if addressed_to(msg, node_id):
                node.wake()
        return True

    async def _follow_rollouts(self) -> None:
        await bus.follow(self.cfg.redis_url, bus.ROLLOUTS, self.on_message)
