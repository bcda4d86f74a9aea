"""The Kubernetes manifests (deploy/kubernetes/): rendered as kustomize lists them, validated against the schemas.

Rendering is reading kustomization.yaml's ``resources`` in order (it uses no
transformers, so `kubectl apply -k` sends exactly these documents); each
document is checked by ``kubernetes-validate`` against the bundled JSON schemas
of Kubernetes, strict (an unknown field fails), offline. Then what the schemas
cannot say: every container has requests, limits and probes, the control plane
is probed on /healthz and /readyz, workers are placed by node selector, secrets
come from the Secret, the gateway is behind a Service.
"""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.support import REPO

K8S = REPO / "deploy" / "kubernetes"
# The oldest Kubernetes the manifests promise to work with, and the newest schema bundled.
VERSIONS = ("1.29", kubernetes_validate.latest_version())
CONTROL_PLANE = {"monitor": 8001, "splitter": 8002, "broadcast": 8003, "orchestrator": 8000}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def render() -> list[dict[str, Any]]:
    """Every document of every resource file kustomization.yaml lists, in its order."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert set(kustomization) == {"apiVersion", "kind", "resources"}, "a transformer would change the output"
    docs = []
    for name in kustomization["resources"]:
        docs.extend(d for d in yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")) if d)
    return docs


def _workloads() -> list[dict[str, Any]]:
    return [d for d in render() if d["kind"] in WORKLOADS]


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _by_name(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in render() if d["kind"] == kind}


def test_every_listed_file_exists_and_every_file_is_listed() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))["resources"]
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk


@pytest.mark.parametrize("version", VERSIONS)
def test_every_document_validates_against_the_kubernetes_schemas(version: str) -> None:
    docs = render()
    assert len(docs) >= 15
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validation_can_fail() -> None:
    """A misspelled field and a wrong type are caught, so the test above checks something."""
    deployment = copy.deepcopy(_by_name("Deployment")["orchestrator"])
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)
    deployment = copy.deepcopy(_by_name("Deployment")["orchestrator"])
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_every_container_has_requests_limits_and_probes() -> None:
    for workload in _workloads():
        for c in _containers(workload):
            where = f"{workload['metadata']['name']}/{c['name']}"
            for kind in ("requests", "limits"):
                assert set(c["resources"][kind]) >= {"cpu", "memory"}, where
            assert "livenessProbe" in c and "readinessProbe" in c, where


@pytest.mark.parametrize("name", sorted(CONTROL_PLANE))
def test_control_plane_is_probed_on_healthz_and_readyz_and_served(name: str) -> None:
    deployment = _by_name("Deployment")[name]
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    assert c["args"] == [name, "--host", "0.0.0.0", "--port", str(CONTROL_PLANE[name])]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["ports"] == [{"name": "http", "containerPort": CONTROL_PLANE[name]}]
    service = _by_name("Service")[name]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["port"] == CONTROL_PLANE[name]


def test_every_service_selects_some_pods() -> None:
    pods = [w["spec"]["template"]["metadata"]["labels"] for w in _workloads()]
    for name, service in _by_name("Service").items():
        selector = service["spec"]["selector"].items()
        assert any(selector <= labels.items() for labels in pods), name


def test_workers_per_node_class_with_node_selectors_and_cpu_shares() -> None:
    workers = {n: d for n, d in _by_name("Deployment").items() if n.startswith("worker-")}
    assert set(workers) == {"worker-standard", "worker-small"}
    cpus = {}
    for name, d in workers.items():
        spec = d["spec"]["template"]["spec"]
        assert spec["nodeSelector"] == {"edgeorch.io/node-class": name.removeprefix("worker-")}
        (c,) = spec["containers"]
        assert c["resources"]["requests"] == c["resources"]["limits"], (
            "a worker's speed is its guaranteed share"
        )
        cpus[name] = c["resources"]["limits"]["cpu"]
        env = {e["name"]: e for e in c["env"]}
        assert env["EDGEORCH_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["EDGEORCH_ADVERTISE_URL"]["value"] == "http://$(POD_IP):8100"
    assert cpus == {"worker-standard": "1", "worker-small": "500m"}


def test_secrets_come_from_the_secret_only() -> None:
    secret_keys = set()
    for workload in _workloads():
        for c in _containers(workload):
            for e in c.get("env", []):
                if any(w in e["name"] for w in ("TOKEN", "SECRET", "PASSWORD", "DATABASE_URL", "API_KEYS")):
                    assert "value" not in e, (
                        f"{workload['metadata']['name']}: {e['name']} written in the file"
                    )
                    secret_keys.add(e["valueFrom"]["secretKeyRef"]["key"])
    assert secret_keys == {"admin-token", "rollout-secret", "postgres-password", "database-url", "api-keys"}
    assert not [d for d in render() if d["kind"] == "Secret"], (
        "the Secret is made by the operator, not shipped"
    )


def test_gateway_service_and_stores_are_there() -> None:
    services = _by_name("Service")
    assert services["orchestrator"]["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http"}]
    assert {"redis", "postgres"} <= set(services)
    config = _by_name("ConfigMap")["edgeorch-config"]["data"]
    assert config["EDGEORCH_REDIS_URL"] == "redis://redis:6379/0"
    assert {d["metadata"].get("namespace") for d in render() if d["kind"] != "Namespace"} == {"edgeorch"}
