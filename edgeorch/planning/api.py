"""The planner behind ``POST /v1/plan``: a validated request in, a response out.

The service calls :func:`plan_request`; the orchestrator or a benchmark may
call it too, or go one level down to :func:`plan` with a
:class:`~edgeorch.planning.problem.Problem`.
"""

from __future__ import annotations

from edgeorch.planning.baselines import STRATEGIES
from edgeorch.planning.explain import cause_report, explain, predicted
from edgeorch.planning.optimal import OBJECTIVE_UNITS, PlanResult, plan_optimal
from edgeorch.planning.problem import Problem, Workload, build_problem
from edgeorch.planning.revision import revise
from edgeorch.schemas.plan import PlanRequest, PlanResponse, PlanStage, Revision, SolverInfo


def problem_from_request(req: PlanRequest) -> Problem:
    """The request as planner arrays (the request is already validated)."""
    prof = req.profile
    units = prof.units
    w = req.workload
    return build_problem(
        unit_names=[u.name for u in units],
        param_bytes=[u.param_bytes for u in units],
        flops_per_token=[u.flops_per_token for u in units],
        out_bytes_per_token=[u.out_bytes_per_token for u in units],
        kv_bytes_per_token=[u.kv_bytes_per_token for u in units],
        node_ids=[n.id for n in req.nodes],
        memory_bytes=[n.memory_bytes for n in req.nodes],
        flops_per_s=[n.flops_per_s for n in req.nodes],
        trusted=[n.trusted for n in req.nodes],
        watts=[n.watts for n in req.nodes],
        links=[(link.src, link.dst, link.bandwidth_bytes_per_s, link.rtt_s) for link in req.links],
        default_link=(req.default_link.bandwidth_bytes_per_s, req.default_link.rtt_s)
        if req.default_link
        else None,
        source=req.source,
        input_bytes_per_token=prof.input_bytes_per_token,
        result_bytes_per_token=prof.result_bytes_per_token,
        workload=Workload(w.prompt_tokens, w.generated_tokens, w.max_sessions, w.context_tokens),
        trusted_units=req.trusted_units,
        objective=req.objective,
        current_stages=[(s.node, s.start, s.end) for s in req.current_plan] if req.current_plan else None,
        migration_weight=req.migration_weight,
        max_migration_bytes=req.max_migration_bytes,
        time_limit_s=req.time_limit_s,
    )


def plan(problem: Problem, strategy: str = "optimal") -> PlanResult:
    """Plan with the optimal planner or a baseline rule; raises InfeasibleError with causes."""
    if strategy == "optimal":
        return plan_optimal(problem)
    return STRATEGIES[strategy](problem)


def response_for(problem: Problem, result: PlanResult, strategy: str) -> PlanResponse:
    """The API answer for a plan: stages, predictions, solver, revision, explanation."""
    ids = problem.node_ids
    report = revise(problem, result.stages)
    revision = None
    if report is not None:
        revision = Revision(
            kind=report.kind,
            migration_bytes=report.migration_bytes,
            moved_units=list(report.moved_units),
            current_feasible=report.current_feasible,
            current_predicted=predicted(report.current_evaluation) if report.current_evaluation else None,
            current_violations=[cause_report(c) for c in report.current_violations],
        )
    return PlanResponse(
        stages=[PlanStage(node=ids[s.node], start=s.start, end=s.end) for s in result.stages],
        predicted=predicted(result.evaluation),
        migration_bytes=result.evaluation.migration_bytes,
        solver=SolverInfo(
            name=result.solver,
            strategy=strategy,
            optimal=result.optimal,
            time_s=result.time_s,
            objective_value=result.objective_value,
            objective_unit=OBJECTIVE_UNITS[problem.objective],
            bound=result.bound,
            gap=result.gap,
            branches=result.nodes_explored,
        ),
        revision=revision,
        explanation=explain(problem, result.evaluation),
    )


def plan_request(req: PlanRequest) -> PlanResponse:
    """Plan a validated request end to end (CPU-bound: run it off the event loop)."""
    problem = problem_from_request(req)
    return response_for(problem, plan(problem, req.strategy), req.strategy)
