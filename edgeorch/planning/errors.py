"""Domain errors of the planner, with causes a caller can act on.

The splitter translates these into HTTP 422 at its edge; library callers (the
orchestrator, benchmarks) read the structured :class:`Cause` list directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Cause:
    """One reason a plan is impossible (or a given plan is invalid).

    ``kind`` is a stable machine-readable tag; ``message`` says the same for a
    person. The lists name what is involved: node ids, unit indices, directed
    links as ``(src, dst)``; ``short_by_bytes`` maps a node id to how many
    bytes of memory it lacks.
    """

    kind: str
    message: str
    nodes: tuple[str, ...] = ()
    units: tuple[int, ...] = ()
    links: tuple[tuple[str, str], ...] = ()
    short_by_bytes: dict[str, int] = field(default_factory=dict)


class PlanningError(Exception):
    """Base class of every error the planner raises on purpose."""


class InfeasibleError(PlanningError):
    """No plan satisfies the constraints (or the chosen rule yields none)."""

    def __init__(self, message: str, causes: list[Cause]):
        super().__init__(message)
        self.message = message
        self.causes = causes


class UnsupportedRequestError(PlanningError):
    """A well-formed request asks for something the planner does not offer."""
