"""A scripted plan change on local workers: two versions of a chain and a route provider that commits the second.

For the KV-migration test and benchmark: both versions' stages are loaded
on real worker processes up front (as a rollout's PREPARE leaves them), and
:class:`ScriptedRoutes` — the gateway's RouteProvider without a controller —
answers the first version until a session has taken ``switch_after`` steps,
then the second (as a COMMIT would). ``on_switch`` runs once at that moment
(a test kills a source worker there to crash a migration).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from edgeorch.local.chain import load_chain
from edgeorch.orchestration.generation import ChainFailure, Route
from edgeorch.orchestration.move_cost import MoveEstimate
from edgeorch.schemas.rollout import PlacedStage
from edgeorch.schemas.stage import NextHop


def load_version(
    deployment: str,
    version: int,
    model: str,
    placement: list[tuple[str, str, int, int]],
    options: dict | None = None,
) -> Route:
    """Load one plan version, stage i on ``placement[i]`` = (node id, url, start, end); its route."""
    ids = load_chain([p[1] for p in placement], model, [(p[2], p[3]) for p in placement],
                      prefix=f"{deployment}.v{version}", options=options)  # fmt: skip
    fmt = (options or {}).get("format", "fp32")
    stages = []
    for i, (node, url, start, end) in enumerate(placement):
        nxt = NextHop(url=placement[i + 1][1], stage_id=ids[i + 1]) if i + 1 < len(placement) else None
        stages.append(PlacedStage(stage_id=ids[i], node_id=node, url=url, model=model, start=start, end=end,
                                  next=nxt, format=fmt))  # fmt: skip
    return Route(deployment, version, tuple(stages))


@dataclass
class ScriptedRoutes:
    """Route provider: ``first`` until ``switch_after`` steps were seen, then ``second``."""

    first: Route
    second: Route
    switch_after: int | None = None  # None: never switch
    on_switch: Callable[[], None] | None = None
    ready: Callable[[], bool] | None = None  # also wait for this (e.g. every session past its prefill)
    # Prices a move (RouteProvider.move_estimate); None: no prediction, the gateway migrates.
    estimate: Callable[[Route, Route, int], MoveEstimate | None] | None = None
    steps: int = 0
    switched: bool = field(default=False, init=False)

    async def route(self, deployment: str) -> Route:
        """The route new sessions start on."""
        return self.first

    async def recover(self, route: Route, failed_node: str | None, error: str) -> Route:
        """No re-planning here: a failure the second route cannot absorb ends the session."""
        if route.version < self.second.version and self.switched:
            return self.second
        raise ChainFailure(502, f"no route around {failed_node}: {error[:200]}")

    def spot_check(self, route: Route, tokens: list[int]) -> None:
        """No spot checks here (RouteProvider)."""

    def tainted(self, nodes: set[str]) -> str | None:
        """Nothing is ever tainted here (RouteProvider)."""
        return None

    async def settle(self, route: Route, tokens: list[int], since: float) -> None:
        """Nothing to wait for here (RouteProvider)."""

    def move_estimate(self, old: Route, new: Route, position: int) -> MoveEstimate | None:
        """What ``estimate`` says (RouteProvider)."""
        return self.estimate(old, new, position) if self.estimate is not None else None

    def newer(self, route: Route) -> Route | None:
        """The second route once the switch point has passed (called once per step)."""
        self.steps += 1
        if self.switch_after is None or self.steps <= self.switch_after:
            return None
        if not self.switched and self.ready is not None and not self.ready():
            return None
        if not self.switched:
            self.switched = True
            if self.on_switch is not None:
                self.on_switch()
        return self.second if route.version < self.second.version else None
