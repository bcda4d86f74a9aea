"""One-shot deploy step for a running stack: calibrate the workers, create a deployment, wait until ready.

docker-compose.yml runs it as its ``deploy`` service once the control plane and
the workers are healthy: ``python -m edgeorch.local.deploy_step --model smollm2-135m
--workers worker-a,worker-b,worker-c``. It talks to the services over HTTP only
(the admin token from ``EDGEORCH_ADMIN_TOKEN``) and exits 0 once the deployment
is ready, 1 when it failed or timed out; run again, it finds the deployment
there and only waits for it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import httpx

from edgeorch.security.certs import client_verify

log = logging.getLogger(__name__)


class DeployError(RuntimeError):
    """The deployment could not be made ready; the message says why."""


def calibrate(client: httpx.Client, monitor_url: str, model: str, nodes: list[str], timeout_s: float) -> None:
    """Ask every node to calibrate ``model`` and wait until the named ones have reported a speed."""
    resp = client.post(f"{monitor_url}/v1/profiles", json={"model": model})
    if resp.status_code != 202:
        raise DeployError(f"the monitor refused to calibrate {model} ({resp.status_code}): {resp.text[:300]}")
    deadline, missing = time.monotonic() + timeout_s, set(nodes)
    while missing and time.monotonic() < deadline:
        views = client.get(f"{monitor_url}/v1/nodes", params={"model": model}).json()
        missing = set(nodes) - {v["node_id"] for v in views if v.get("flops_per_s")}
        time.sleep(0.5 if missing else 0)
    # A node that never reports is left out of the first plan, not fatal: the plan improves as it joins.
    if missing:
        log.warning("not calibrated after %.0f s: %s; deploying anyway", timeout_s, sorted(missing))
    for view in client.get(f"{monitor_url}/v1/nodes", params={"model": model}).json():
        log.info("node %s: %.3g flop/s on %s", view["node_id"], view.get("flops_per_s") or 0.0, model)


def deploy(client: httpx.Client, url: str, name: str, model: str, timeout_s: float) -> dict:
    """Create deployment ``name`` (an existing one is taken as is) and return its view once ready."""
    resp = client.post(f"{url}/v1/deployments", json={"name": name, "model": model})
    if resp.status_code not in (200, 201, 409):
        raise DeployError(f"the orchestrator refused the deployment ({resp.status_code}): {resp.text[:300]}")
    deadline, state = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        view = client.get(f"{url}/v1/deployments/{name}").json()
        if view.get("state") != state:
            state = view.get("state")
            log.info("deployment %s: %s %s", name, state, view.get("reason") or "")
        if state == "ready":
            return view
        if state == "failed":
            raise DeployError(f"deployment {name} failed: {view.get('reason')}")
        time.sleep(1.0)
    raise DeployError(f"deployment {name} not ready after {timeout_s:.0f} s (state {state})")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m edgeorch.local.deploy_step``; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m edgeorch.local.deploy_step", description=__doc__)
    p.add_argument("--url", default="http://orchestrator:8000", help="the orchestrator")
    p.add_argument("--monitor-url", default="http://monitor:8001", help="the monitor")
    p.add_argument("--model", default="smollm2-135m", help="model to deploy")
    p.add_argument("--name", help="deployment name (default: the model's name)")
    p.add_argument("--workers", default="", help="comma-separated node ids to wait for at calibration")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for calibration and for readiness")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s deploy: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    token = os.environ.get("EDGEORCH_ADMIN_TOKEN", "")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    nodes = [n for n in args.workers.split(",") if n]
    try:
        with httpx.Client(timeout=60.0, headers=headers, verify=client_verify()) as client:
            calibrate(client, args.monitor_url, args.model, nodes, args.timeout)
            view = deploy(client, args.url, args.name or args.model, args.model, args.timeout)
    except (DeployError, httpx.HTTPError) as exc:
        log.error("%s", exc)
        return 1
    for stage in view.get("stages", []):
        log.info("stage units [%s, %s) on %s", stage["start"], stage["end"], stage["node"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
