"""Every object the chart renders with all its extension values set, judged by the real API server:
a server-side dry run (server-side apply with dryRun=All) of each one validates it against the
built-in schemas and admission (RBAC escalation checks included) without storing anything."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import DynamicApiError

from tests.e2e.kube import Kube

from .helm import RELEASE_NAMESPACE, Manifest, kinds, render

pytestmark = pytest.mark.e2e

DATA = Path(__file__).parent / "data"
EXTENSIONS = DATA / "values-extensions.yaml"
FIELD_MANAGER = "melange-chart-test"


@pytest.fixture(scope="module")
def cluster(kube: Kube) -> Kube:
    """The test control plane with the release namespace and the monitoring kinds served."""
    for document in kube.apply_file(DATA / "monitoring-crds.yaml"):
        kube.wait_established(document["metadata"]["name"])
    try:
        kube.create_namespace(RELEASE_NAMESPACE)
    except ApiException as exc:
        if exc.status != 409:  # already there from an earlier module of the session
            raise
    return kube


def dry_run(kube: Kube, manifest: Manifest) -> dict[str, Any]:
    resource = kube.resource((manifest["apiVersion"], manifest["kind"]))
    dynamic: Any = kube.dynamic  # the dynamic client is not annotated
    applied = dynamic.server_side_apply(
        resource,
        body=manifest,
        name=manifest["metadata"]["name"],
        namespace=manifest["metadata"].get("namespace"),
        field_manager=FIELD_MANAGER,
        force_conflicts=True,
        dry_run="All",
    )
    return dict(applied.to_dict())


def dry_run_each(kube: Kube, manifests: list[Manifest]) -> dict[str, dict[str, Any]]:
    """Each manifest as the API server would store it, by `Kind/name`; fails naming every one
    it refused. What it would store carries the rendered labels (defaults added, none dropped)."""
    accepted, refused = {}, {}
    for manifest in manifests:
        name = f"{manifest['kind']}/{manifest['metadata']['name']}"
        try:
            accepted[name] = dry_run(kube, manifest)
        except DynamicApiError as exc:
            refused[name] = str(exc)
            continue
        assert accepted[name]["metadata"]["labels"] == manifest["metadata"]["labels"], name
    assert not refused, refused
    return accepted


def test_every_object_with_every_extension_value_is_accepted(cluster: Kube) -> None:
    manifests = render(yaml.safe_load(EXTENSIONS.read_text()))
    assert set(kinds(manifests)) >= {
        "ClusterRole",
        "ConfigMap",
        "CustomResourceDefinition",
        "Deployment",
        "NetworkPolicy",
        "PrometheusRule",
        "ServiceMonitor",
    }
    accepted = dry_run_each(cluster, manifests)
    for manifest in manifests:
        if manifest["kind"] == "Deployment":
            pod = accepted[f"Deployment/{manifest['metadata']['name']}"]["spec"]["template"]["spec"]
            rendered = manifest["spec"]["template"]["spec"]
            assert pod["topologySpreadConstraints"] == rendered["topologySpreadConstraints"]
            assert pod["volumes"][1]["configMap"]["name"] == "prometheus-ca"
    # A dry run stores nothing.
    dynamic: Any = cluster.dynamic
    policies = dynamic.get(
        cluster.resource(("networking.k8s.io/v1", "NetworkPolicy")), namespace=RELEASE_NAMESPACE
    )
    assert not [p for p in policies.items if p.metadata.name.startswith("rel-")]


def test_the_dry_run_refuses_what_the_schema_lets_through(cluster: Kube) -> None:
    """The check bites: a spread constraint the values schema accepts (it leaves the fields of
    Kubernetes objects to the API server) but the API server refuses."""
    values = yaml.safe_load(EXTENSIONS.read_text())
    values["topologySpreadConstraints"][0]["maxSkew"] = 0
    (deployment,) = [m for m in render(values) if m["kind"] == "Deployment"]
    deployment["metadata"]["name"] = f"refused-{uuid.uuid4().hex[:6]}"
    with pytest.raises(DynamicApiError) as error:
        dry_run(cluster, deployment)
    assert "maxSkew" in str(error.value)


ROUTER_VALUES = DATA / "values-router.yaml"


def test_every_router_object_with_every_router_value_is_accepted(cluster: Kube) -> None:
    """The router's objects (router.enabled, every router value set, the HPA owning the replica
    count), judged by the API server; its Role goes to the allocation's namespace."""
    values = yaml.safe_load(ROUTER_VALUES.read_text())
    allocation_namespace = values["router"]["allocation"]["namespace"]
    try:
        cluster.create_namespace(allocation_namespace)
    except ApiException as exc:
        if exc.status != 409:
            raise
    routed = [
        m
        for m in render(values)
        if m["metadata"]["labels"].get("app.kubernetes.io/component") == "router"
    ]
    assert kinds(routed) == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Role",
        "Role",
        "RoleBinding",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ]
    for name, accepted in dry_run_each(cluster, routed).items():
        if name.startswith("HorizontalPodAutoscaler/"):
            assert accepted["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 600
            assert len(accepted["spec"]["metrics"]) == 2
        if name.startswith("Role/"):
            assert accepted["metadata"]["namespace"] == allocation_namespace

    # Without autoscaling too (spec.replicas set, no HPA), with the default values.
    plain = render({"router": {"enabled": True, "allocation": {"name": "mixed"}}})
    (deployment,) = [
        m for m in plain if m["kind"] == "Deployment" and "router" in m["metadata"]["name"]
    ]
    assert dry_run(cluster, deployment)["spec"]["replicas"] == 2
