"""Cost model and planners: pure functions over plain arrays, no I/O, no torch.

Entry points:

- :func:`plan_request`: a validated :class:`~edgeorch.schemas.plan.PlanRequest`
  in, a :class:`~edgeorch.schemas.plan.PlanResponse` out (what the splitter serves).
- :func:`plan`: a :class:`Problem` and a strategy in, a :class:`PlanResult` out.
- :func:`evaluate` / :func:`violations`: the cost model of DESIGN.md §3 on any plan.

Every planner raises :class:`InfeasibleError` (with structured causes) when no
plan satisfies the constraints or, for a baseline, when its rule's plan does not.
"""

from edgeorch.planning.api import plan, plan_request, problem_from_request, response_for
from edgeorch.planning.baselines import STRATEGIES
from edgeorch.planning.cost import Evaluation, evaluate, score, violations
from edgeorch.planning.errors import Cause, InfeasibleError, PlanningError, UnsupportedRequestError
from edgeorch.planning.optimal import PlanResult, plan_optimal
from edgeorch.planning.problem import Problem, Stage, Workload, build_problem, merge_stages
from edgeorch.planning.revision import classify

__all__ = [
    "STRATEGIES",
    "Cause",
    "Evaluation",
    "InfeasibleError",
    "PlanResult",
    "PlanningError",
    "Problem",
    "Stage",
    "UnsupportedRequestError",
    "Workload",
    "build_problem",
    "classify",
    "evaluate",
    "merge_stages",
    "plan",
    "plan_optimal",
    "plan_request",
    "problem_from_request",
    "response_for",
    "score",
    "violations",
]
