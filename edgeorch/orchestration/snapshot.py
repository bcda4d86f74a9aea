"""Turn what the monitor measured into the splitter's question (pure: no I/O).

The orchestrator reads ``GET /v1/nodes?model=`` and ``GET /v1/links`` from
the monitor and asks ``POST /v1/plan``; this module is the translation, so
it can be tested on plain records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgeorch.planning.api import problem_from_request
from edgeorch.planning.batching import BATCH_GROWTH, predict_serving
from edgeorch.planning.cost import evaluate, plan_formats
from edgeorch.planning.problem import Stage
from edgeorch.schemas.monitor import LinkView, NodeView
from edgeorch.schemas.orchestrator import PredictedView, QosPolicy
from edgeorch.schemas.plan import MAX_NODES, DefaultLink, LinkSpec, NodeSpec, PlanRequest, PlanStage, Workload
from edgeorch.schemas.profile import ModelProfile

# A link the monitor has not measured yet (a node that joined a second ago)
# is not unreachable: every node the monitor knows reached it over HTTP. It
# is assumed fast until measured, which takes about a second.
UNMEASURED_BANDWIDTH_BYTES_PER_S = 1e9
UNMEASURED_RTT_S = 0.002
# The cost model (DESIGN.md §3) charges a hop rtt/2 per token: the request
# crosses the link once and the answer goes straight back to the source. Our
# workers answer back along the chain, so every hop's link is crossed by the
# request and by the response of every step: a full round trip. The planner
# is therefore given twice the measured RTT. Without this, a middle link
# slowed to 150 ms RTT cost 1.8x the latency measured on the static plan, but
# the planner predicted only a 20-25 % gain from moving off it, below the
# 30 % hysteresis, so it stayed put for 25 s. Known bias: the model's exit
# hop (last stage -> source) is then charged a round trip that our data
# plane does not pay (the answer rides the previous hop's response), which
# makes a slow node look slightly worse as the last stage than it is.
RTT_CHARGE_FACTOR = 2.0
# The unmeasured links go to the splitter as one default, not one LinkSpec per
# pair: at 1,000 nodes the full mesh is a million links (a ~100 MB request),
# while the monitor measures each node's links to a few ring peers only.
UNMEASURED_LINK = DefaultLink(
    bandwidth_bytes_per_s=UNMEASURED_BANDWIDTH_BYTES_PER_S, rtt_s=RTT_CHARGE_FACTOR * UNMEASURED_RTT_S
)


class NoNodesError(RuntimeError):
    """No live, calibrated node may host the deployment."""


@dataclass(frozen=True)
class Cluster:
    """The live nodes (calibrated on the model) and their links, as the planner needs them."""

    nodes: list[NodeSpec]
    links: list[LinkSpec]
    urls: dict[str, str]
    # Measured prefill speed per node on the model, where the monitor has one: the
    # orchestrator's predictions charge the prompt at it (the splitter does not see it).
    prefill_flops_per_s: dict[str, float] = field(default_factory=dict)


def trusted_units(policy: QosPolicy, num_units: int) -> list[int]:
    """Units that must run on trusted nodes under the policy."""
    units = set(policy.trusted_units)
    if policy.privacy == "edges":
        units |= {0, num_units - 1}
    elif policy.privacy == "all":
        units |= set(range(num_units))
    return sorted(u for u in units if 0 <= u < num_units)


def plan_candidates(specs: list[NodeSpec], keep: set[str], limit: int = MAX_NODES) -> list[NodeSpec]:
    """At most ``limit`` nodes for one plan request, in their given order.

    A fleet can hold more live nodes than one request may name (a splitter's
    bound, :data:`~edgeorch.schemas.plan.MAX_NODES`). Then the nodes in
    ``keep`` (the plan in force) stay, a quarter of the room goes to the
    fastest trusted nodes (so a privacy policy keeps its candidates), and the
    rest to the fastest others. The nodes left out are the slowest: a plan
    over a thousand nodes uses a few dozen of them.
    """
    if len(specs) <= limit:
        return specs
    rank = sorted(specs, key=lambda n: (-n.flops_per_s, -n.memory_bytes, n.id))
    chosen = {n.id for n in specs if n.id in keep}
    trusted = [n.id for n in rank if n.trusted and n.id not in chosen]
    chosen.update(trusted[: max(0, min(limit // 4, limit - len(chosen)))])
    for n in rank:
        if len(chosen) >= limit:
            break
        chosen.add(n.id)
    return [n for n in specs if n.id in chosen]


def cluster_from_monitor(
    nodes: list[NodeView],
    links: list[LinkView],
    allowed: list[str] | None,
    exclude: set[str],
    model: str | None = None,
    keep: set[str] | None = None,
    limit: int = MAX_NODES,
) -> Cluster:
    """Nodes that are alive, calibrated and allowed, and the measured links between two of them
    (every other pair is :data:`UNMEASURED_LINK`, the request's default). With ``model`` (the
    profile key), also each node's measured prefill speed on it. Past ``limit`` nodes, only
    :func:`plan_candidates` (``keep``: the plan in force) are named."""
    specs, urls, prefill = [], {}, {}
    for n in nodes:
        nid = n.node_id
        if n.state != "alive" or not n.flops_per_s or nid in exclude:
            continue
        if allowed is not None and nid not in allowed:
            continue
        specs.append(NodeSpec(id=nid, memory_bytes=n.memory_bytes, flops_per_s=n.flops_per_s,
                              trusted=n.trusted, watts=n.watts))  # fmt: skip
        urls[nid] = n.url
        speed = n.speeds.get(model) if model else None
        report = n.profiles.get(model) if model else None
        value = (speed.prefill_flops_per_s if speed else None) or (
            report.prefill_flops_per_s if report else None
        )
        if value:
            prefill[nid] = value
    if not specs:
        raise NoNodesError("no live node calibrated on this model" + (f" (excluded {sorted(exclude)})"
                                                                       if exclude else ""))  # fmt: skip
    if len(specs) > limit:
        specs = plan_candidates(specs, keep or set(), limit)
        urls = {n.id: urls[n.id] for n in specs}
        prefill = {k: v for k, v in prefill.items() if k in urls}
    ids = set(urls)
    specs_links = []
    for lk in links:
        if lk.src == lk.dst or lk.src not in ids or lk.dst not in ids:
            continue
        # Kept inside LinkSpec's bounds here, so the LinkSpec can be built unvalidated: at 1,000
        # nodes validating 16,000 of them on every look cost a tenth of the orchestrator's CPU.
        bandwidth = min(max(lk.bandwidth_bytes_per_s or UNMEASURED_BANDWIDTH_BYTES_PER_S, 1.0), 1e15)
        rtt = min(RTT_CHARGE_FACTOR * (lk.rtt_s if lk.rtt_s is not None else UNMEASURED_RTT_S), 3600.0)
        specs_links.append(
            LinkSpec.model_construct(src=lk.src, dst=lk.dst, bandwidth_bytes_per_s=bandwidth, rtt_s=rtt)
        )
    return Cluster(specs, specs_links, urls, prefill)


def choose_source(cluster: Cluster, policy: QosPolicy) -> str:
    """Where requests enter: the policy's node if it is live, else the first trusted, else the first."""
    ids = [n.id for n in cluster.nodes]
    if policy.source in ids:
        return policy.source
    trusted = sorted(n.id for n in cluster.nodes if n.trusted)
    return trusted[0] if trusted else sorted(ids)[0]


def plan_request(
    profile: ModelProfile,
    cluster: Cluster,
    policy: QosPolicy,
    current: Sequence[PlanStage] | None,
    time_limit_s: float = 0.1,
) -> PlanRequest:
    """The splitter request for this deployment now."""
    return PlanRequest(
        profile=profile,
        nodes=cluster.nodes,
        links=cluster.links,
        default_link=UNMEASURED_LINK,
        source=choose_source(cluster, policy),
        objective=policy.objective,
        strategy=policy.strategy,
        workload=policy.workload,
        trusted_units=trusted_units(policy, profile.num_units),
        current_plan=list(current) if current else None,
        migration_weight=policy.migration_weight if policy.objective != "throughput" else 0.0,
        time_limit_s=time_limit_s,
    )


def local_problem(req: PlanRequest, prefill: Mapping[str, float] | None = None):
    """The request as a Problem, with the prompt charged at each node's measured prefill speed.

    A node without a measured prefill speed keeps its decode speed for the
    prompt (the planners' model). Without this, a prefill-heavy workload is
    predicted several times slower than it runs (a batched prompt computes
    far faster per token than a decode step), and every hop looks a smaller
    share of a request than it is.
    """
    problem = problem_from_request(req)
    if not prefill:
        return problem
    speeds = np.array(
        [prefill.get(nid, float(problem.flops_per_s[i])) for i, nid in enumerate(problem.node_ids)]
    )
    return dataclasses.replace(problem, prefill_flops_per_s=speeds)


def restricted(req: PlanRequest, nodes: set[str]) -> PlanRequest:
    """``req`` with only ``nodes`` and the source, and the links between them (no current plan).

    What the cost model needs to judge plans on those nodes: a plan's figures
    read only its own nodes, the hops between them and the source's. The
    orchestrator judges the current and the candidate plans on this, not on
    the whole fleet: at 1,000 nodes every :func:`local_problem` of the full
    request built 1,000 x 1,000 link matrices (8 MB each), five problems per
    look, and the orchestrator's resident memory held them (issue 23)."""
    keep = nodes | {req.source}
    return req.model_copy(update={
        "nodes": [n for n in req.nodes if n.id in keep],
        "links": [link for link in req.links if link.src in keep and link.dst in keep],
        "current_plan": None,
    })  # fmt: skip


def move_basis(req: PlanRequest, prefill: Mapping[str, float] | None, nodes: set[str]):
    """The look's measurements restricted to ``nodes`` (the old and new routes' and the source):
    what the gateway prices a session's move with (:mod:`edgeorch.orchestration.move_cost`).

    Restricted so that a deployment keeps a few nodes' figures between looks,
    not a 1,000-node fleet's link matrices."""
    return local_problem(restricted(req, nodes), prefill)


def stage_formats(stages: Sequence[PlanStage]) -> dict[int, str]:
    """Activation format per boundary unit: the hop out of each stage leads into the next one's start."""
    return {nxt.start: cur.activation_format for cur, nxt in zip(stages, stages[1:], strict=False)}


def with_formats(
    req: PlanRequest,
    stages: Sequence[PlanStage],
    policy: QosPolicy,
    prefill: Mapping[str, float] | None = None,
) -> list[PlanStage] | None:
    """``stages`` with each hop's activation format chosen from its link under the policy; None if a node is gone.

    The cost model picks a lossy format for a hop only when it saves a real
    share of the plan's predicted latency and the quality budget pays for it
    (:func:`edgeorch.planning.cost.plan_formats`); every other hop, and the
    last stage, stays fp32.
    """
    index = {n.id: i for i, n in enumerate(req.nodes)}
    if any(s.node not in index for s in stages):
        return None
    plan_stages = [Stage(index[s.node], s.start, s.end) for s in stages]
    chosen = plan_formats(local_problem(req.model_copy(update={"current_plan": None}), prefill), plan_stages,
                          policy.activation_formats, policy.quality_budget, current=stage_formats(stages))  # fmt: skip
    out = []
    for i, s in enumerate(stages):
        fmt = chosen.get(stages[i + 1].start, "fp32") if i + 1 < len(stages) else "fp32"
        out.append(s.model_copy(update={"activation_format": fmt}))
    return out


def predict(
    req: PlanRequest, stages: Sequence[PlanStage], prefill: Mapping[str, float] | None = None
) -> PredictedView | None:
    """The cost model's figures for ``stages`` under ``req``'s measurements; None if a node is gone.

    ``step_s`` is one token through the chain and back (entry hop, every
    stage, every hop, exit hop): the figure a decode step is measured against.
    Each hop is charged in its stage's ``activation_format``; with
    ``prefill`` the request's prompt at those speeds (:func:`local_problem`).
    """
    index = {n.id: i for i, n in enumerate(req.nodes)}
    if any(s.node not in index for s in stages):
        return None
    plan_stages = [Stage(index[s.node], s.start, s.end) for s in stages]
    formats = stage_formats(stages)
    full = evaluate(local_problem(req, prefill), plan_stages, formats)
    one = req.model_copy(update={
        "workload": Workload(prompt_tokens=1, generated_tokens=0, max_sessions=1,
                             context_tokens=req.workload.context_tokens),
        "current_plan": None,
    })  # fmt: skip
    step = evaluate(problem_from_request(one), plan_stages, formats)
    compute = sum(c.compute_s for c in step.stages)
    sessions = req.workload.max_sessions
    batch = (
        predict_serving(compute, step.latency_s - compute, sessions, BATCH_GROWTH)
        if step.latency_s > 0
        else None
    )
    return PredictedView(
        latency_s=full.latency_s,
        throughput_tokens_per_s=full.throughput_tokens_per_s,
        energy_j=full.energy_j,
        step_s=step.latency_s,
        compute_step_s=compute,
        batch_sessions=sessions,
        batch_tokens_per_s=batch.tokens_per_s if batch else None,
        batch_step_s=batch.cycle_s if batch else None,
    )


def objective_value(p: PredictedView, objective: str) -> float:
    """The figure the objective minimises (throughput as seconds per token)."""
    if objective == "latency":
        return p.latency_s
    if objective == "energy":
        return p.energy_j
    return 1.0 / p.throughput_tokens_per_s if p.throughput_tokens_per_s else 0.0
