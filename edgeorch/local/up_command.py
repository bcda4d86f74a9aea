"""`edgeorch up`: the whole stack on this machine, one deployment, one sample answer, until Ctrl-C.

Steps: prepare the model store; generate an admin token (unless
EDGEORCH_ADMIN_TOKEN is set); start :class:`edgeorch.local.stack.LocalStack`; create
the deployment through the orchestrator's API and wait until it is ready;
print where everything listens, the active plan and a sample answer; then
wait for SIGINT/SIGTERM (or, with ``--once``, stop at once) and stop
everything.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from edgeorch.schemas.orchestrator import QosPolicy
from edgeorch.schemas.profile import WeightFormat

if TYPE_CHECKING:
    from edgeorch.local.scenario import Scenario

DEFAULT_MODEL = "smollm2-135m"
SAMPLE_PROMPT = "What is the capital of France?"
SAMPLE_MAX_TOKENS = 32


class UpError(RuntimeError):
    """`edgeorch up` cannot go on; the message says why and where to look."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `edgeorch up`."""
    p.add_argument("--workers", type=int, help="number of workers (default: as many as the scenario lists)")
    p.add_argument("--scenario", type=Path, help="scenario YAML (default: scenarios/demo.yaml)")
    p.add_argument(
        "--model", default=None,
        help="model to deploy: a store name (prepared, imported or synthesised); default: the scenario's, "
        "else smollm2-135m",
    )  # fmt: skip
    p.add_argument(
        "--format", choices=get_args(WeightFormat), default=None,
        help="weight format of every stage; default: the scenario policy's, else fp32, or the format a "
        "packed-only model was written in",
    )  # fmt: skip
    p.add_argument(
        "--once", action="store_true", help="start, deploy, answer the sample, then stop and exit (CI)"
    )
    p.add_argument("--store", help="model store (default: EDGEORCH_MODEL_STORE or ~/.cache/edgeorch/models)")
    p.add_argument("--log-dir", type=Path, help="one log file per service (default: a new temporary dir)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the deployment")
    p.add_argument("--database-url", help="one SQL database for every service (default: SQLite files)")
    p.add_argument(
        "--tls", nargs="?", const="", default=None, metavar="DIR",
        help="mutual TLS between every process: a CA and certificates made in DIR (default: the log "
        "dir's certs/), every service and worker serves HTTPS and calls its peers with its certificate",
    )  # fmt: skip
    p.add_argument(
        "--private-redis", action="store_true",
        help="start a redis-server of its own even when one answers (stacks sharing a Redis see each "
        "other's node events)",
    )  # fmt: skip


def _out(msg: str = "") -> None:
    print(msg, flush=True)


def _progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    cells = [headers, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _detail(resp) -> str:
    try:
        return str(resp.json().get("detail", resp.text))
    except ValueError:
        return resp.text[:500]


def create_deployment(
    client, url: str, token: str, name: str, model: str, policy: dict | None = None
) -> None:
    """POST /v1/deployments; an existing deployment of the same name is taken as is."""
    body = {"name": name, "model": model, "policy": policy or {"objective": "latency"}}
    resp = client.post(f"{url}/v1/deployments", json=body, headers=_headers(token))
    if resp.status_code == 409:
        _progress(f"deployment {name} exists already")
    elif resp.status_code not in (200, 201):
        raise UpError(f"the orchestrator refused the deployment ({resp.status_code}): {_detail(resp)}")


def calibrate(client, monitor_url: str, token: str, model: str, nodes: list[str], timeout_s: float) -> None:
    """Have every node calibrate ``model`` before the first plan, so that plan can use all of them.

    The orchestrator plans as soon as some nodes are calibrated and improves the plan as
    others report; waiting here keeps the demo's first plan from leaving a node out.
    """
    resp = client.post(f"{monitor_url}/v1/profiles", json={"model": model}, headers=_headers(token))
    if resp.status_code != 202:
        raise UpError(f"the monitor refused to calibrate {model} ({resp.status_code}): {_detail(resp)}")
    start, missing = time.monotonic(), set(nodes)
    while missing and time.monotonic() - start < timeout_s:
        views = client.get(f"{monitor_url}/v1/nodes", params={"model": model}).json()
        missing = set(nodes) - {n["node_id"] for n in views if n.get("flops_per_s")}
        if missing:
            time.sleep(0.5)
    if missing:
        _progress(f"not calibrated after {timeout_s:.0f} s: {sorted(missing)}; deploying anyway")
    else:
        _progress(f"[{time.monotonic() - start:5.1f}s] {len(nodes)} nodes calibrated on {model}")


def wait_ready(client, url: str, name: str, timeout_s: float, log_dir: Path) -> dict[str, Any]:
    """Poll the deployment until it is ready; print each change of state on the way."""
    start = time.monotonic()
    last: tuple[str, str | None] | None = None
    view: dict[str, Any] = {}
    while time.monotonic() - start < timeout_s:
        resp = client.get(f"{url}/v1/deployments/{name}")
        if resp.status_code != 200:
            raise UpError(f"GET /v1/deployments/{name} answered {resp.status_code}: {_detail(resp)}")
        view = resp.json()
        state, reason = view.get("state"), view.get("reason")
        if (state, reason) != last:
            suffix = f" ({reason})" if reason else ""
            _progress(f"[{time.monotonic() - start:5.1f}s] deployment {name}: {state}{suffix}")
            last = (state, reason)
        if state == "ready":
            return view
        if state == "failed":
            raise UpError(f"deployment {name} failed: {reason}; logs in {log_dir}")
        time.sleep(1.0)
    raise UpError(
        f"deployment {name} not ready after {timeout_s:.0f} s (last state: {view.get('state')}"
        f"{': ' + str(view.get('reason')) if view.get('reason') else ''}); "
        f"see the logs in {log_dir} (orchestrator.log, monitor.log, broadcast.log, one per worker)"
    )


def plan_table(view: dict[str, Any]) -> str:
    """The active plan: stage, node, unit range, where it listens."""
    rows = []
    for i, s in enumerate(view.get("stages") or []):
        rows.append(
            [i, s["node"], f"{s['start']}:{s['end']} ({s['end'] - s['start']} units)", s.get("url") or ""]
        )
    return format_table(["stage", "node", "units", "url"], rows)


def _predicted_line(view: dict[str, Any]) -> str:
    p = view.get("predicted") or {}
    if not p:
        return "predicted: (none)"
    tps = p.get("throughput_tokens_per_s")
    return (
        f"predicted: {1000 * p['step_s']:.1f} ms per token, {p['latency_s']:.2f} s per request, "
        f"{tps:.1f} tokens/s, {p['energy_j']:.1f} J" if tps is not None else
        f"predicted: {1000 * p['step_s']:.1f} ms per token, {p['latency_s']:.2f} s per request"
    )  # fmt: skip


def _measured_line(view: dict[str, Any]) -> str:
    """The gateway's own measure of the decode steps so far (the sample's)."""
    m = view.get("measured") or {}
    if not m.get("step_s"):
        return "measured: (no decode steps yet)"
    return (f"measured: {1000 * m['step_s']:.1f} ms per decode step (median of {m['steps']}), "
            f"{1 / m['step_s']:.2f} decode tokens/s")  # fmt: skip


def sample_answer(client, url: str, key: str, view: dict[str, Any]) -> str:
    """A chat completion (decoders) or an embedding (encoders) through the gateway."""
    name = view["name"]
    if view.get("kind") == "encoder":
        resp = client.post(f"{url}/v1/embeddings", json={"model": name, "input": SAMPLE_PROMPT},
                           headers=_headers(key))  # fmt: skip
        if resp.status_code != 200:
            raise UpError(f"the sample embedding failed ({resp.status_code}): {_detail(resp)}")
        emb = resp.json()["data"][0]["embedding"]
        return f"embedding of {SAMPLE_PROMPT!r}: {len(emb)} dimensions, starting {emb[:3]}"
    body = {"model": name, "messages": [{"role": "user", "content": SAMPLE_PROMPT}],
            "temperature": 0, "max_tokens": SAMPLE_MAX_TOKENS}  # fmt: skip
    resp = client.post(f"{url}/v1/chat/completions", json=body, headers=_headers(key))
    if resp.status_code != 200:
        raise UpError(f"the sample chat completion failed ({resp.status_code}): {_detail(resp)}")
    return resp.json()["choices"][0]["message"]["content"]


def _print_summary(stack, view: dict[str, Any], generated_token: bool) -> None:
    rows = [[name, where, path] for name, where, path in stack.listing()]
    _out("\nservices:")
    _out(format_table(["service", "listens on", "log"], rows))
    _out(f"\ndashboard: {stack.orchestrator_url}/  (nodes, plans and every decision, live)")
    _out(f"\nactive plan of {view['name']} (version {view.get('version')}):")
    _out(plan_table(view))
    _out(_predicted_line(view))
    _out("\nfor the scripts in scripts/:")
    _out(f"  export EDGEORCH_URL={stack.orchestrator_url}")
    _out(f"  export EDGEORCH_MONITOR_URL={stack.monitor_url}")
    if stack.workers:
        _out(f"  export EDGEORCH_WORKER_URL={stack.workers[0].url}")
    if stack.api_keys:
        _out(f"  export EDGEORCH_API_KEY={stack.api_keys[0]}")
    if stack.tls_dir is not None:
        d = stack.tls_dir
        _out(f"  # mutual TLS: every service wants a certificate of {d}/ca.pem, e.g.")
        _out(
            f"  # curl --cacert {d}/ca.pem --cert {d}/client.pem --key {d}/client.key {stack.orchestrator_url}/healthz"
        )
    if stack.admin_token:
        how = "generated for this run" if generated_token else "from the environment"
        _out(f"  export EDGEORCH_ADMIN_TOKEN={stack.admin_token}   # {how}")


def _wait_for_stop() -> None:
    """Block until SIGINT or SIGTERM."""
    _out("\nrunning; Ctrl-C stops everything")
    while True:
        signal.pause()


def _raise_interrupt(signum, _frame) -> None:
    # Once: a second Ctrl-C while the stack stops must not cut the stopping short and leak processes.
    signal.signal(signal.SIGINT, _already_stopping)
    signal.signal(signal.SIGTERM, _already_stopping)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _already_stopping(_signum, _frame) -> None:
    print("stopping already; every process gets up to 10 s", file=sys.stderr, flush=True)


def _tls_dir(flag: str | None, log_dir: Path) -> Path | None:
    """Where `--tls` makes its certificates (None: no TLS)."""
    if flag is None:
        return None
    return Path(flag) if flag else log_dir / "certs"


def _serve(args: argparse.Namespace, scenario: Scenario, policy: QosPolicy, store_root: Path, token: str,
           generated: bool) -> int:  # fmt: skip
    import httpx

    from edgeorch.local.stack import LocalStack
    from edgeorch.schemas.profile import profile_key

    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="edgeorch-up-"))
    api_keys = [k.strip() for k in os.environ.get("EDGEORCH_API_KEYS", "").split(",") if k.strip()]
    _out(f"starting the stack; logs in {log_dir}")
    stack = LocalStack(
        scenario, workers=args.workers, model_store=store_root, log_dir=log_dir,
        state_dir=log_dir / "state", database_url=args.database_url, admin_token=token,
        api_keys=api_keys, torch_threads=args.threads, private_redis=args.private_redis,
        default_ports=True, report=_progress, tls_dir=_tls_dir(args.tls, log_dir),
    )  # fmt: skip
    with stack, httpx.Client(timeout=600.0, verify=stack.client_tls or True) as client:
        url = stack.orchestrator_url
        key = profile_key(args.model, policy.weight_format)
        _out(f"calibrating {key} on {len(stack.workers)} workers ...")
        calibrate(client, stack.monitor_url, token, key, [w.name for w in stack.workers], 120.0)
        _out(f"creating deployment {args.model} ({policy.weight_format}) ...")
        create_deployment(client, url, token, args.model, args.model, policy.model_dump(mode="json"))
        view = wait_ready(client, url, args.model, args.timeout, log_dir)
        _print_summary(stack, view, generated)
        _out(f"\nsample: {SAMPLE_PROMPT}")
        t0 = time.monotonic()
        answer = sample_answer(client, url, api_keys[0] if api_keys else "", view)
        _out(f"answer ({time.monotonic() - t0:.1f} s): {answer}")
        _out(_measured_line(client.get(f"{url}/v1/deployments/{args.model}").json()))
        if not args.once:
            _wait_for_stop()
        _out("stopping ...")
    return 0


def choose_format(store, model: str, asked: str | None) -> str:
    """The weight format to deploy ``model`` in (``asked``, None: a default), preparing it first if it is
    one of the store's recipes.

    Only the model deployed is prepared: an imported or synthesised model
    needs no other. Default: fp32, or for a packed-only (synthesised) model
    the first format it was written in. ModelStoreError if ``model`` is not
    in the store or cannot be served in ``asked``.
    """
    from edgeorch.models.store import RECIPES, ModelStoreError
    from edgeorch.models.unitfile import servable_formats

    if model in RECIPES:
        store.prepare([model], progress=False)
    formats = servable_formats(store.path(model))
    if asked is None:
        asked = "fp32" if "fp32" in formats else (formats or ["fp32"])[0]
    if asked not in formats:
        raise ModelStoreError(f"model {model!r} can be served in {formats or 'no format'}, not {asked!r}")
    return asked


def run_up(args: argparse.Namespace) -> int:
    """`edgeorch up`; returns the exit code."""
    import httpx

    from edgeorch.local.scenario import ScenarioError, load_scenario
    from edgeorch.local.stack import StackError
    from edgeorch.models.store import ModelStore, ModelStoreError
    from edgeorch.service.settings import CommonSettings

    # SIGTERM stops the stack the same way Ctrl-C does: through the `with` blocks' exits. SIGINT
    # too, explicitly: a shell starts background jobs with SIGINT ignored, and Python keeps that.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    store = ModelStore(Path(args.store) if args.store else CommonSettings().model_store)
    try:
        scenario = load_scenario(args.scenario)
        args.model = args.model or scenario.model or DEFAULT_MODEL
        policy = scenario.policy or QosPolicy()
        asked = args.format or (policy.weight_format if "weight_format" in policy.model_fields_set else None)
        policy = policy.model_copy(update={"weight_format": choose_format(store, args.model, asked)})
        _out(f"model store {store.root}: {', '.join(store.prepared())}")
        token = os.environ.get("EDGEORCH_ADMIN_TOKEN", "")
        generated = not token
        if generated:
            token = secrets.token_urlsafe(24)
            _out(f"admin token for this run: {token}")
        return _serve(args, scenario, policy, store.root, token, generated)
    except (UpError, StackError, ScenarioError, ModelStoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"error: the orchestrator did not answer: {exc!r} (its log: orchestrator.log)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _out("stopped")
        return 0
