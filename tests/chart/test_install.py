"""The chart installed for real with Helm into the test control plane, and the operator running with
exactly the permissions the chart grants (its ServiceAccount's token, out of cluster)."""

from __future__ import annotations

import copy
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.dynamic.exceptions import ForbiddenError, NotFoundError

from melange import api
from melange.plan import solver
from tests.controlplane.harness import ControlPlane
from tests.e2e.kube import Kinds, Kube, eventually
from tests.e2e.test_operator import SPEC as E2E_SPEC

from .expected import DEFAULT_RULES
from .release import OperatorRun, Release

pytestmark = pytest.mark.e2e

CLUSTER_ROLE = ("rbac.authorization.k8s.io/v1", "ClusterRole")
ROLE = ("rbac.authorization.k8s.io/v1", "Role")
DEPLOYMENT = ("apps/v1", "Deployment")
SERVICE = ("v1", "Service")
SERVICE_ACCOUNT = ("v1", "ServiceAccount")
CRD = ("apiextensions.k8s.io/v1", "CustomResourceDefinition")

# The e2e allocation with the pools the chart's default values cover (Deployment, MachineDeployment),
# and its third GPU type, a kind the defaults do not list, resized through replicasPath.
SPEC: dict[str, Any] = {**E2E_SPEC, "gpus": copy.deepcopy(E2E_SPEC["gpus"][:2])}
NODE_POOL_GPU: dict[str, Any] = copy.deepcopy(E2E_SPEC["gpus"][2])
NODE_POOL_TARGET = {"apiGroup": "test.melange.dev", "resource": "nodepools", "via": "replicasPath"}


def allocation(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "melange.dev/v1alpha1",
        "kind": "MelangeAllocation",
        "metadata": {"name": name},
        "spec": copy.deepcopy(spec),
    }


def planned(spec: dict[str, Any]) -> dict[str, int]:
    return solver.solve_spec(api.validate_spec(spec)).replicas()


def cluster_object(kube: Kube, kind: tuple[str, str], name: str) -> dict[str, Any]:
    dynamic: Any = kube.dynamic  # the dynamic client is not annotated
    return dict(dynamic.get(kube.resource(kind), name=name).to_dict())


def absent(probe: Any) -> None:
    with pytest.raises(NotFoundError):
        probe()


def equal(actual: object, expected: object) -> None:
    assert actual == expected


@pytest.fixture
def release(control_plane: ControlPlane, kube: Kube, tmp_path: Path) -> Iterator[Release]:
    """A release name and its own namespace; uninstalled at the end if the test did not."""
    suffix = uuid.uuid4().hex[:8]
    kube.create_namespace(f"ops-{suffix}")
    rel = Release(control_plane, f"rel-{suffix}", f"ops-{suffix}", tmp_path)
    yield rel
    if rel.installed:
        rel.uninstall()


def test_install_upgrade_uninstall(kube: Kube, release: Release, namespace: str) -> None:
    out = release.install()
    assert "STATUS: deployed" in out
    assert "It serves MelangeAllocations in all namespaces" in out  # NOTES.txt
    name, ns = release.fullname, release.namespace

    deployment = kube.get(DEPLOYMENT, name, ns)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["--liveness=http://0.0.0.0:8080/healthz", "--metrics-port=8000"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert kube.get(SERVICE_ACCOUNT, name, ns)
    assert kube.get(SERVICE, f"{name}-metrics", ns)["spec"]["ports"][0]["name"] == "metrics"
    assert cluster_object(kube, CLUSTER_ROLE, name)["rules"] == DEFAULT_RULES
    crd = cluster_object(kube, CRD, "melangeallocations.melange.dev")
    assert crd["spec"]["names"]["kind"] == "MelangeAllocation"

    # Changing values changes the cluster: a namespaced operator gets a Role instead of the
    # ClusterRole, and its Deployment gets the flags.
    release.upgrade({"watchNamespaces": [namespace], "metrics": {"port": 9100}})
    absent(lambda: cluster_object(kube, CLUSTER_ROLE, name))
    assert kube.get(ROLE, name, namespace)["rules"] == DEFAULT_RULES
    deployment = kube.get(DEPLOYMENT, name, ns)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == [
        f"--namespace={namespace}",
        "--liveness=http://0.0.0.0:8080/healthz",
        "--metrics-port=9100",
    ]
    assert deployment["metadata"]["labels"]["app.kubernetes.io/instance"] == release.name

    # Uninstalling removes what the chart made, except the CRD (Helm never deletes crds/); the
    # allocations stay, and carry no finalizer that would wait for the operator.
    kube.create(allocation("kept", SPEC), namespace)
    release.uninstall()
    absent(lambda: kube.get(DEPLOYMENT, name, ns))
    absent(lambda: kube.get(SERVICE_ACCOUNT, name, ns))
    absent(lambda: kube.get(ROLE, name, namespace))
    assert cluster_object(kube, CRD, "melangeallocations.melange.dev")
    kept = kube.allocation("kept", namespace)
    assert not kept["metadata"].get("finalizers")
    kube.delete(Kinds.allocation, "kept", namespace)
    absent(lambda: kube.allocation("kept", namespace))


def test_operator_pod_meets_the_restricted_pod_security_standard(
    kube: Kube, release: Release
) -> None:
    """The API server's PodSecurity admission judges the chart's pod template: with no controllers
    running, the test creates the pod the Deployment would create, in a namespace that enforces
    the "restricted" level."""
    core = client.CoreV1Api(kube.api_client)
    labels = {"pod-security.kubernetes.io/enforce": "restricted"}
    core.patch_namespace(release.namespace, {"metadata": {"labels": labels}})
    release.install()
    template = kube.get(DEPLOYMENT, release.fullname, release.namespace)["spec"]["template"]

    def pod(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}

    created = kube.create(pod("operator", template["spec"]), release.namespace)
    assert created["spec"]["securityContext"]["runAsNonRoot"] is True

    # The same check refuses a weaker pod, so the acceptance above means something.
    weaker = copy.deepcopy(template["spec"])
    weaker["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    with pytest.raises(ForbiddenError, match="violates PodSecurity"):
        kube.create(pod("weaker", weaker), release.namespace)


@pytest.mark.parametrize("scope", ["namespaced", "cluster-wide"])
def test_operator_works_with_exactly_the_charts_permissions(
    scope: str, kube: Kube, release: Release, namespace: str, tmp_path: Path
) -> None:
    values: dict[str, Any] = {"watchNamespaces": [namespace]} if scope == "namespaced" else {}
    release.install(values)
    kubeconfig = release.kubeconfig(kube, tmp_path / "operator.kubeconfig")
    identity = f"system:serviceaccount:{release.namespace}:{release.fullname}"

    kube.deployment("pool-l4", namespace, replicas=5)
    kube.machine_deployment("pool-a100", namespace, replicas=5)
    kube.node_pool("pool-h100", namespace, size=5)

    # The operator's identity reaches node pools only through what the values list.
    as_operator = Kube(kubeconfig)
    with pytest.raises(ForbiddenError):
        as_operator.get(Kinds.deployment, "pool-l4", namespace)  # only deployments/scale
    with pytest.raises(ForbiddenError):
        as_operator.get(Kinds.node_pool, "pool-h100", namespace)

    operator = OperatorRun(kubeconfig, values.get("watchNamespaces", []), tmp_path / "operator.log")
    operator.start()
    try:
        with_node_pool = {**SPEC, "gpus": [*SPEC["gpus"], NODE_POOL_GPU]}
        kube.create(allocation("chat", SPEC), namespace)
        kube.create(allocation("mixed", with_node_pool), namespace)
        expected = planned(SPEC)
        assert expected == {"L4": 2, "A100": 1}

        # Allowed kinds are scaled to the plan, status and Events are written.
        def reconciled() -> None:
            assert kube.replicas(Kinds.deployment, "pool-l4", namespace) == expected["L4"]
            assert kube.replicas(Kinds.machine_deployment, "pool-a100", namespace) == 1
            ready = kube.condition("chat", namespace, "Ready")
            assert ready is not None
            assert (ready["status"], ready["reason"]) == ("True", "Reconciled")

        eventually(reconciled)
        chat = kube.allocation("chat", namespace)
        assert "melange.dev/last-handled-configuration" in chat["metadata"]["annotations"]
        assert not chat["metadata"].get("finalizers")
        events = kube.events(namespace, "chat")
        assert {e["reason"] for e in events} >= {"Scaled", "Reconciled"}

        # A kind the values do not list is refused by the API server, and said so by name.
        def refused() -> dict[str, Any]:
            scaled = kube.condition("mixed", namespace, "Scaled")
            assert scaled is not None
            assert (scaled["status"], scaled["reason"]) == ("False", "ScaleFailed")
            return scaled

        message = eventually(refused)["message"]
        assert message.startswith("NodePool/pool-h100 (H100): forbidden: ")
        assert identity in message
        assert kube.replicas(Kinds.node_pool, "pool-h100", namespace) == 5

        # Listing the kind in the values (and upgrading) is all it takes: the next retry works.
        targets = [
            {"apiGroup": "apps", "resource": "deployments", "via": "scale"},
            {"apiGroup": "cluster.x-k8s.io", "resource": "machinedeployments", "via": "scale"},
            NODE_POOL_TARGET,
        ]
        release.upgrade({**values, "rbac": {"scaleTargets": targets}})
        h100 = planned(with_node_pool)["H100"]

        def node_pool_scaled() -> None:
            assert kube.replicas(Kinds.node_pool, "pool-h100", namespace) == h100
            ready = kube.condition("mixed", namespace, "Ready")
            assert ready is not None
            assert ready["status"] == "True", ready

        eventually(node_pool_scaled, timeout=90)
    finally:
        operator.stop()
        for name in ("chat", "mixed"):
            kube.delete(Kinds.allocation, name, namespace)
        print(f"--- operator log (tail) ---\n{operator.log()[-8000:]}")

    # Nothing the operator itself does (watching, annotating, status, Events) was ever refused.
    log = operator.log()
    assert not refusals(log, namespace)
    assert "Failed to post an event" not in log


def refusals(log: str, namespace: str) -> list[str]:
    """Log lines about a refused request, other than the NodePool refused on purpose. A cluster-wide
    operator also serves allocations that other tests left in their namespaces: not ours to judge.
    Kopf's dumps of an allocation's body are not requests: after a restart they echo the status
    message of the NodePool refused earlier."""
    return [
        line
        for line in log.splitlines()
        if re.search(r"forbidden|\b403\b", line, re.IGNORECASE)
        and "{'apiVersion': 'melange.dev/v1alpha1'" not in line
        and "nodepools" not in line
        and not re.search(rf'namespace \\?"(?!{namespace}\b)', line)
        and not re.search(rf"\[(?!{namespace}/)[a-z0-9-]+/[^\]]+\]", line)  # [ns/name] prefix
    ]
