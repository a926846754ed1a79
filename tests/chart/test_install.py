"""The chart installed for real with Helm into the test control plane, and the operator running with
exactly the permissions the chart grants (its ServiceAccount's token, out of cluster)."""

from __future__ import annotations

import contextlib
import copy
import http.server
import json
import re
import shutil
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import ForbiddenError, NotFoundError

from melange import api
from melange.plan import solver
from tests.controlplane.harness import ControlPlane
from tests.e2e.kube import CRD_FILE, Kinds, Kube, eventually
from tests.e2e.test_operator import SPEC as E2E_SPEC
from tests.e2e.test_route_kube import own_address

from .expected import DEFAULT_RULES, leader_args, lease_rules, router_args, router_rules
from .helm import CHART, HelmError
from .release import OperatorRun, Release, RouterRun

pytestmark = pytest.mark.e2e

CLUSTER_ROLE = ("rbac.authorization.k8s.io/v1", "ClusterRole")
ROLE = ("rbac.authorization.k8s.io/v1", "Role")
DEPLOYMENT = ("apps/v1", "Deployment")
SERVICE = ("v1", "Service")
SERVICE_ACCOUNT = ("v1", "ServiceAccount")
CRD = ("apiextensions.k8s.io/v1", "CustomResourceDefinition")
PDB = ("policy/v1", "PodDisruptionBudget")
ROLE_BINDING = ("rbac.authorization.k8s.io/v1", "RoleBinding")
CLUSTER_ROLE_BINDING = ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding")
LEASE = ("coordination.k8s.io/v1", "Lease")
TAIL_ARGS = ["--liveness=http://0.0.0.0:8080/healthz", "--metrics-port=8000"]

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
    # the next step it gives works on a bare cluster (tests/e2e/test_examples_apply.py)
    assert "kubectl apply -n serving -f examples/pools/mixed.yaml -f examples/mixed.yaml" in out
    name, ns = release.fullname, release.namespace
    assert f"electing a leader with the Lease {ns}/{name}" in out
    # The session's CRD is not this release's (tests/chart/release.py): the notes say so.
    assert "crds.install is false: install and upgrade the CRD" in out

    deployment = kube.get(DEPLOYMENT, name, ns)
    assert deployment["spec"]["replicas"] == 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == [*leader_args(name), *TAIL_ARGS]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert kube.get(PDB, name, ns)["spec"]["maxUnavailable"] == 1
    assert kube.get(ROLE, f"{name}-leader-election", ns)["rules"] == lease_rules(name)
    assert kube.get(SERVICE_ACCOUNT, name, ns)
    assert kube.get(SERVICE, f"{name}-metrics", ns)["spec"]["ports"][0]["name"] == "metrics"
    assert cluster_object(kube, CLUSTER_ROLE, name)["rules"] == DEFAULT_RULES
    crd = cluster_object(kube, CRD, "melangeallocations.melange.dev")
    assert crd["spec"]["names"]["kind"] == "MelangeAllocation"

    # Changing values changes the cluster: a namespaced operator gets a Role instead of the
    # ClusterRole, and its Deployment gets the flags; a single replica gets no disruption budget.
    release.upgrade({"watchNamespaces": [namespace], "metrics": {"port": 9100}, "replicaCount": 1})
    absent(lambda: cluster_object(kube, CLUSTER_ROLE, name))
    absent(lambda: kube.get(PDB, name, ns))
    assert kube.get(ROLE, name, namespace)["rules"] == DEFAULT_RULES
    deployment = kube.get(DEPLOYMENT, name, ns)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == [
        f"--namespace={namespace}",
        *leader_args(name),
        "--liveness=http://0.0.0.0:8080/healthz",
        "--metrics-port=9100",
    ]
    assert deployment["metadata"]["labels"]["app.kubernetes.io/instance"] == release.name

    # Without leader election: one replica, replaced by Recreate, and no Lease permissions.
    release.upgrade(
        {"watchNamespaces": [namespace], "leaderElection": {"enabled": False}, "replicaCount": 1}
    )
    deployment = kube.get(DEPLOYMENT, name, ns)
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == [f"--namespace={namespace}", "--no-leader-elect", *TAIL_ARGS]
    absent(lambda: kube.get(ROLE, f"{name}-leader-election", ns))

    # Uninstalling removes what the chart made, except the CRD (Helm never deletes crds/); the
    # allocations stay, and carry no finalizer that would wait for the operator.
    kube.create(allocation("kept", SPEC), namespace)
    release.uninstall()
    absent(lambda: kube.get(DEPLOYMENT, name, ns))
    absent(lambda: kube.get(SERVICE_ACCOUNT, name, ns))
    absent(lambda: kube.get(ROLE, name, namespace))
    absent(lambda: kube.get(ROLE_BINDING, name, namespace))
    assert cluster_object(kube, CRD, "melangeallocations.melange.dev")
    kept = kube.allocation("kept", namespace)
    assert not kept["metadata"].get("finalizers")
    kube.delete(Kinds.allocation, "kept", namespace)
    absent(lambda: kube.allocation("kept", namespace))


def allowed(kube: Kube, user: str, **attributes: str) -> bool:
    """What the API server's RBAC authorizer answers for `user` (a SubjectAccessReview)."""
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=user,
            groups=["system:serviceaccounts", "system:authenticated"],
            resource_attributes=client.V1ResourceAttributes(**attributes),
        )
    )
    status = client.AuthorizationV1Api(kube.api_client).create_subject_access_review(review).status
    assert status is not None
    return bool(status.allowed)


def lease(name: str, holder: str) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15},
    }


def test_operator_identity_may_hold_its_lease_and_nothing_more(
    kube: Kube, release: Release, namespace: str, tmp_path: Path
) -> None:
    """The leader-election Role, exercised with the ServiceAccount's own token: the calls the
    election makes (get, create, update of the release's Lease) work, others are refused."""
    release.install()
    ns, name = release.namespace, release.fullname
    as_operator = Kube(release.kubeconfig(kube, tmp_path / "operator.kubeconfig"))
    resource = as_operator.resource(LEASE)
    dynamic: Any = as_operator.dynamic

    created = as_operator.create(lease(name, "operator-0"), ns)
    taken = {**created, "spec": {**created["spec"], "holderIdentity": "operator-1"}}
    dynamic.replace(resource, body=taken, namespace=ns)
    assert as_operator.get(LEASE, name, ns)["spec"]["holderIdentity"] == "operator-1"

    # create cannot be narrowed by name, so another Lease can be created in the release namespace,
    # but never read or renewed: it cannot hold any Lease but its own.
    other = as_operator.create(lease("other", "operator-0"), ns)
    with pytest.raises(ForbiddenError):
        as_operator.get(LEASE, "other", ns)
    with pytest.raises(ForbiddenError):
        dynamic.replace(resource, body=other, namespace=ns)
    with pytest.raises(ForbiddenError):  # nor delete or patch its own
        as_operator.merge_patch(LEASE, name, ns, {"spec": {"holderIdentity": "x"}})
    with pytest.raises(ForbiddenError):
        as_operator.delete(LEASE, name, ns)
    with pytest.raises(ForbiddenError):  # and nothing outside the release namespace
        as_operator.create(lease(name, "operator-0"), namespace)

    # No cluster-scoped kind is reachable until the values list it.
    user = f"system:serviceaccount:{ns}:{name}"
    nodepools = {"group": "karpenter.sh", "resource": "nodepools", "name": "gpu"}
    assert not allowed(kube, user, verb="patch", subresource="scale", **nodepools)
    release.upgrade({"clusterScopedTargets": ["nodepools.karpenter.sh"]})
    assert allowed(kube, user, verb="get", subresource="scale", **nodepools)
    assert allowed(kube, user, verb="patch", subresource="scale", **nodepools)
    assert allowed(kube, user, verb="get", **nodepools)
    assert not allowed(kube, user, verb="patch", **nodepools)  # only through /scale
    assert not allowed(kube, user, verb="delete", **nodepools)
    assert not allowed(kube, user, verb="list", group="karpenter.sh", resource="nodepools")
    nodeclaims = {"group": "karpenter.sh", "resource": "nodeclaims", "name": "gpu"}
    assert not allowed(kube, user, verb="patch", subresource="scale", **nodeclaims)
    role = f"{name}-cluster-scoped-targets"
    assert cluster_object(kube, CLUSTER_ROLE, role)["rules"] == [
        {
            "apiGroups": ["karpenter.sh"],
            "resources": ["nodepools/scale"],
            "verbs": ["get", "patch"],
        },
        {"apiGroups": ["karpenter.sh"], "resources": ["nodepools"], "verbs": ["get"]},
    ]
    deployment = kube.get(DEPLOYMENT, name, ns)
    assert (
        "--allow-cluster-scoped=nodepools.karpenter.sh"
        in (deployment["spec"]["template"]["spec"]["containers"][0]["args"])
    )
    release.uninstall()
    absent(lambda: cluster_object(kube, CLUSTER_ROLE, role))
    absent(lambda: cluster_object(kube, CLUSTER_ROLE_BINDING, role))
    assert not allowed(kube, user, verb="patch", subresource="scale", **nodepools)


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
    # "mixed" has pools of its own: a pool belongs to one allocation (a second one is refused).
    kube.deployment("mixed-l4", namespace, replicas=5)
    kube.machine_deployment("mixed-a100", namespace, replicas=5)

    # The operator's identity reaches node pools only through what the values list.
    as_operator = Kube(kubeconfig)
    # a Deployment's ready count may be read (make-before-break), its size set only through /scale
    assert as_operator.get(Kinds.deployment, "pool-l4", namespace)["spec"]["replicas"] == 5
    with pytest.raises(ForbiddenError):
        as_operator.merge_patch(Kinds.deployment, "pool-l4", namespace, {"spec": {"replicas": 1}})
    with pytest.raises(ForbiddenError):
        as_operator.get(Kinds.node_pool, "pool-h100", namespace)

    deployment = kube.get(DEPLOYMENT, release.fullname, release.namespace)
    operator = OperatorRun(kubeconfig, deployment, tmp_path / "operator.log")
    assert f"--lease-namespace={release.namespace}" in operator.args
    assert f"--identity={operator.pod_name}" in operator.args
    operator.start()
    try:
        own_pools = copy.deepcopy(SPEC["gpus"])
        for gpu, pool in zip(own_pools, ["mixed-l4", "mixed-a100"], strict=True):
            gpu["scaleTargetRef"]["name"] = pool
        with_node_pool = {**SPEC, "gpus": [*own_pools, NODE_POOL_GPU]}
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
        # Only its status is written: no annotations and no finalizer on the allocation.
        assert not chat["metadata"].get("annotations")
        assert not chat["metadata"].get("finalizers")
        # Events are posted right after the status write
        eventually(
            lambda: _superset(
                {e["reason"] for e in kube.events(namespace, "chat")}, {"Scaled", "Reconciled"}
            )
        )
        # It reconciled as the leader, holding the release's Lease under its pod's name.
        held = kube.get(LEASE, release.fullname, release.namespace)
        assert held["spec"]["holderIdentity"] == operator.pod_name

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


def refusals(log: str, namespace: str, expected: str = "nodepools") -> list[str]:
    """Log lines about a refused request, other than those that mention `expected` (the NodePool
    refused on purpose; "" when none is expected). A cluster-wide operator also serves allocations
    that other tests left in their namespaces: not ours to judge. Kopf's dumps of an allocation's
    body are not requests: after a restart they echo the status message of the NodePool refused
    earlier."""
    return [
        line
        for line in log.splitlines()
        if re.search(r"forbidden|\b403\b", line, re.IGNORECASE)
        and "{'apiVersion': 'melange.dev/v1alpha1'" not in line
        and not (expected and expected in line)
        and not re.search(rf'namespace \\?"(?!{namespace}\b)', line)
        and not re.search(rf"\[(?!{namespace}/)[a-z0-9-]+/[^\]]+\]", line)  # [ns/name] prefix
    ]


def test_namespaced_operator_resizes_a_listed_cluster_scoped_pool(
    kube: Kube, release: Release, namespace: str, tmp_path: Path
) -> None:
    """clusterScopedTargets, end to end with the chart's permissions: an operator that watches one
    namespace (Roles only) resizes a cluster-scoped, Karpenter-shaped NodePool through the
    ClusterRole and the --allow-cluster-scoped flag the value adds."""
    release.install(
        {"watchNamespaces": [namespace], "clusterScopedTargets": ["nodepools.karpenter.sh"]}
    )
    karpenter = kube.resource(("karpenter.sh/v1", "NodePool"))
    dynamic: Any = kube.dynamic
    nodepool = f"gpu-{namespace}"
    body = {"apiVersion": "karpenter.sh/v1", "kind": "NodePool", "metadata": {"name": nodepool}}
    dynamic.create(karpenter, body={**body, "spec": {"replicas": 1}})
    kube.deployment("pool-l4", namespace, replicas=5)
    kube.machine_deployment("pool-a100", namespace, replicas=5)
    h100 = {k: v for k, v in NODE_POOL_GPU.items() if k != "replicasPath"}
    h100["scaleTargetRef"] = {"apiVersion": "karpenter.sh/v1", "kind": "NodePool", "name": nodepool}
    spec = {**SPEC, "gpus": [*copy.deepcopy(SPEC["gpus"]), h100]}
    expected = planned(spec)

    kubeconfig = release.kubeconfig(kube, tmp_path / "operator.kubeconfig")
    deployment = kube.get(DEPLOYMENT, release.fullname, release.namespace)
    operator = OperatorRun(kubeconfig, deployment, tmp_path / "operator.log")
    assert "--allow-cluster-scoped=nodepools.karpenter.sh" in operator.args
    operator.start()
    try:
        kube.create(allocation("karpenter", spec), namespace)

        def scaled() -> None:
            pool = dynamic.get(karpenter, name=nodepool).to_dict()
            assert pool["spec"]["replicas"] == expected["H100"]
            assert kube.replicas(Kinds.deployment, "pool-l4", namespace) == expected["L4"]
            ready = kube.condition("karpenter", namespace, "Ready")
            assert ready is not None
            assert ready["status"] == "True", ready

        eventually(scaled, timeout=90)
    finally:
        operator.stop()
        kube.delete(Kinds.allocation, "karpenter", namespace)
        dynamic.delete(karpenter, name=nodepool)
        print(f"--- operator log (tail) ---\n{operator.log()[-8000:]}")
    assert not refusals(operator.log(), namespace, expected="")


def _superset(seen: set[str], expected: set[str]) -> None:
    assert seen >= expected


CRD_NAME = "melangeallocations.melange.dev"


def test_release_takes_over_upgrades_and_keeps_the_crd(
    control_plane: ControlPlane, kube: Kube, namespace: str, tmp_path: Path
) -> None:
    """The CRD upgrade path (docs/helm.md#crd-upgrades): a CRD installed before the chart rendered
    it (from crds/, or with kubectl) is adopted by labelling and annotating it, then each
    `helm upgrade` applies the chart's CRD, and uninstalling keeps it with the allocations."""
    suffix = uuid.uuid4().hex[:8]
    kube.create_namespace(f"ops-{suffix}")
    release = Release(control_plane, f"crd-{suffix}", f"ops-{suffix}", tmp_path, owns_crd=True)
    dynamic: Any = kube.dynamic
    crds = kube.resource(CRD)
    try:
        # The session's CRD was applied from crds/ without Helm: Helm refuses to take it silently.
        with pytest.raises(HelmError, match="invalid ownership metadata"):
            release.install()
        release.installed = False
        # ... and takes it with the label and annotations docs/helm.md gives.
        dynamic.patch(
            crds,
            name=CRD_NAME,
            body={
                "metadata": {
                    "labels": {"app.kubernetes.io/managed-by": "Helm"},
                    "annotations": {
                        "meta.helm.sh/release-name": release.name,
                        "meta.helm.sh/release-namespace": release.namespace,
                    },
                }
            },
            content_type="application/merge-patch+json",
        )
        out = release.install()
        assert (
            f"The CRD {CRD_NAME} belongs to this release: `helm upgrade` applies a new version of "
            "it, and `helm uninstall` leaves it (helm.sh/resource-policy: keep)."
        ) in out
        crd = cluster_object(kube, CRD, CRD_NAME)
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert crd["metadata"]["labels"]["app.kubernetes.io/instance"] == release.name
        kube.create(allocation("kept", SPEC), namespace)

        # A chart whose CRD changed: the upgrade applies it.
        newer = tmp_path / "chart"
        shutil.copytree(CHART, newer)
        crd_file = newer / "files" / "crds" / f"{CRD_NAME}.yaml"
        document = yaml.safe_load(crd_file.read_text())
        document["spec"]["names"]["shortNames"] = ["mla", "mlalloc"]
        crd_file.write_text(yaml.safe_dump(document, sort_keys=False))
        release.upgrade(chart=newer)
        assert cluster_object(kube, CRD, CRD_NAME)["spec"]["names"]["shortNames"] == [
            "mla",
            "mlalloc",
        ]
        release.upgrade()
        assert cluster_object(kube, CRD, CRD_NAME)["spec"]["names"]["shortNames"] == ["mla"]

        # Another release cannot own it too: it installs with crds.install false.
        other = Release(
            control_plane, f"other-{suffix}", release.namespace, tmp_path, owns_crd=True
        )
        with pytest.raises(HelmError, match="invalid ownership metadata"):
            other.install()

        # Uninstalling keeps the CRD (helm.sh/resource-policy: keep), and so the allocations.
        out = release.uninstall()
        assert f"{CRD_NAME}" in out  # Helm names what it kept
        assert cluster_object(kube, CRD, CRD_NAME)
        assert kube.allocation("kept", namespace)["spec"]["gpus"]
    finally:
        if release.installed:
            release.uninstall()
        # The session's CRD as tests/conftest.py applied it, owned by no release.
        kube.apply_file(CRD_FILE)
        kube.wait_established(CRD_NAME)
        with contextlib.suppress(NotFoundError):
            kube.delete(Kinds.allocation, "kept", namespace)


HPA = ("autoscaling/v2", "HorizontalPodAutoscaler")


def _router_objects(namespace: str) -> list[dict[str, Any]]:
    """What the operator and the model servers put in the allocation's namespace: the routing
    table's ConfigMap, an upstream Service and its EndpointSlice; and a Secret and another
    ConfigMap the router must not read."""
    service_name = "mixed-l4"
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "mixed-routing"},
            "data": {"table.json": '{"schemaVersion": 1}'},
        },
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "other"}, "data": {}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "token"}, "data": {}},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": service_name},
            "spec": {"ports": [{"name": "http", "port": 8000}], "selector": {"app": "vllm"}},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{service_name}-x1",
                "labels": {"kubernetes.io/service-name": service_name},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.1.0.7"], "conditions": {"ready": True}}],
            "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
        },
    ]


def test_router_identity_reads_its_table_and_upstreams_and_nothing_more(
    kube: Kube, release: Release, namespace: str, tmp_path: Path
) -> None:
    """The chart's router (router.enabled) installed for an allocation in another namespace than
    the release's: its objects, its restricted pod, and its RBAC, judged by SubjectAccessReviews
    and exercised with the router ServiceAccount's own token as `melange route` reads the API
    (the table's ConfigMap by name, the upstream Services, their EndpointSlices by label)."""
    core = client.CoreV1Api(kube.api_client)
    restricted = {"pod-security.kubernetes.io/enforce": "restricted"}
    core.patch_namespace(release.namespace, {"metadata": {"labels": restricted}})
    values = {"router": {"enabled": True, "allocation": {"name": "mixed", "namespace": namespace}}}
    out = release.install(values)
    ns, name = release.namespace, f"{release.fullname}-router"
    assert f"Router (melange route) for the allocation {namespace}/mixed" in out  # NOTES.txt
    assert f"http://{name}.{ns}.svc/v1" in out

    deployment = kube.get(DEPLOYMENT, name, ns)
    assert deployment["spec"]["replicas"] == 2
    (route,) = deployment["spec"]["template"]["spec"]["containers"]
    assert route["args"] == router_args("mixed", namespace)
    ports = kube.get(SERVICE, name, ns)["spec"]["ports"]
    assert [(p["name"], p["port"], p["targetPort"]) for p in ports] == [("http", 80, "http")]
    assert kube.get(PDB, name, ns)["spec"]["maxUnavailable"] == 1
    assert kube.get(SERVICE_ACCOUNT, name, ns)
    assert kube.get(ROLE, name, namespace)["rules"] == router_rules("mixed")
    assert kube.get(ROLE_BINDING, name, namespace)["subjects"] == [
        {"kind": "ServiceAccount", "name": name, "namespace": ns}
    ]
    absent(lambda: kube.get(ROLE, name, ns))  # nothing in the release namespace

    # The pod the Deployment would create meets the "restricted" Pod Security Standard.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "router"}}
    assert kube.create({**pod, "spec": deployment["spec"]["template"]["spec"]}, ns)

    # What the API server's authorizer says of the router's identity.
    user = f"system:serviceaccount:{ns}:{name}"
    other = f"ops-{uuid.uuid4().hex[:8]}"
    kube.create_namespace(other)
    table = {"resource": "configmaps", "name": "mixed-routing"}
    slices = {"group": "discovery.k8s.io", "resource": "endpointslices"}
    for verb in ("get", "list", "watch"):
        assert allowed(kube, user, verb=verb, namespace=namespace, **table), verb
    for verb in ("list", "watch"):
        assert allowed(kube, user, verb=verb, namespace=namespace, **slices), verb
    assert allowed(kube, user, verb="get", namespace=namespace, resource="services", name="x")
    refused = [
        # no other ConfigMap, no list of all of them, no writes to its table
        {"verb": "get", "resource": "configmaps", "name": "other"},
        {"verb": "list", "resource": "configmaps"},
        {"verb": "watch", "resource": "configmaps"},
        *({"verb": verb, **table} for verb in ("update", "patch", "delete")),
        {"verb": "create", "resource": "configmaps"},
        # no Secret at all
        *({"verb": verb, "resource": "secrets"} for verb in ("get", "list", "watch")),
        {"verb": "get", "resource": "secrets", "name": "token"},
        # Services and EndpointSlices are read only
        {"verb": "list", "resource": "services"},
        {"verb": "update", "resource": "services", "name": "mixed-l4"},
        {"verb": "create", **slices},
        {"verb": "delete", **slices, "name": "mixed-l4-x1"},
        {"verb": "list", "resource": "pods"},
        {"verb": "list", "group": "melange.dev", "resource": "melangeallocations"},
    ]
    for attributes in refused:
        assert not allowed(kube, user, namespace=namespace, **attributes), attributes
    # Nothing in any other namespace (the release's, another one), nor cluster-wide.
    for elsewhere in (ns, other, ""):
        for verb in ("get", "watch"):
            assert not allowed(kube, user, verb=verb, namespace=elsewhere, **table), elsewhere
        assert not allowed(kube, user, verb="list", namespace=elsewhere, **slices), elsewhere
        assert not allowed(kube, user, verb="watch", namespace=elsewhere, **slices), elsewhere
        assert not allowed(kube, user, verb="get", namespace=elsewhere, resource="services")
        assert not allowed(kube, user, verb="get", namespace=elsewhere, resource="secrets")

    # The operator may publish the table there, and change no other ConfigMap.
    operator = f"system:serviceaccount:{ns}:{release.fullname}"
    for verb in ("get", "update", "delete"):
        assert allowed(kube, operator, verb=verb, namespace=namespace, **table), verb
        assert not allowed(
            kube, operator, verb=verb, namespace=namespace, resource="configmaps", name="other"
        )
        assert not allowed(kube, operator, verb=verb, namespace=other, **table)
    assert allowed(kube, operator, verb="create", namespace=namespace, resource="configmaps")
    assert not allowed(kube, operator, verb="create", namespace=other, resource="configmaps")

    # The same with the router's own token, making the calls the router makes.
    for body in _router_objects(namespace):
        kube.create(body, namespace)
    kube.create({**_router_objects(namespace)[0]}, other)
    as_router = Kube(release.kubeconfig(kube, tmp_path / "router.kubeconfig", service_account=name))
    # The generated clients' models and kubernetes.watch are not annotated.
    core_r: Any = client.CoreV1Api(as_router.api_client)
    discovery: Any = client.DiscoveryV1Api(as_router.api_client)
    watcher: Any = watch.Watch
    by_name = "metadata.name=mixed-routing"
    assert core_r.read_namespaced_config_map("mixed-routing", namespace).data == {
        "table.json": '{"schemaVersion": 1}'
    }
    listed = core_r.list_namespaced_config_map(namespace, field_selector=by_name)
    assert [c.metadata.name for c in listed.items] == ["mixed-routing"]
    events = watcher().stream(
        core_r.list_namespaced_config_map, namespace, field_selector=by_name, timeout_seconds=5
    )
    first = next(events)
    assert (first["type"], first["object"].metadata.name) == ("ADDED", "mixed-routing")
    events.close()
    upstream = "kubernetes.io/service-name=mixed-l4"
    listed = discovery.list_namespaced_endpoint_slice(namespace, label_selector=upstream)
    assert [s.endpoints[0].addresses for s in listed.items] == [["10.1.0.7"]]
    events = watcher().stream(
        discovery.list_namespaced_endpoint_slice,
        namespace,
        label_selector=upstream,
        timeout_seconds=5,
    )
    assert next(events)["object"].metadata.name == "mixed-l4-x1"
    events.close()
    assert core_r.read_namespaced_service("mixed-l4", namespace).spec.ports[0].port == 8000
    forbidden: list[Callable[[], object]] = [
        lambda: core_r.list_namespaced_config_map(namespace),
        lambda: core_r.read_namespaced_config_map("other", namespace),
        lambda: core_r.read_namespaced_secret("token", namespace),
        lambda: core_r.list_namespaced_secret(namespace),
        lambda: core_r.read_namespaced_config_map("mixed-routing", other),
        lambda: discovery.list_namespaced_endpoint_slice(other),
        discovery.list_endpoint_slice_for_all_namespaces,
        lambda: core_r.patch_namespaced_config_map("mixed-routing", namespace, {"data": {}}),
    ]
    for call in forbidden:
        with pytest.raises(ApiException) as error:
            call()
        assert error.value.status == 403

    # An HPA takes over the replica count: the Deployment loses spec.replicas (the API server
    # defaults it to 1 until the HPA's first sync), the budget follows minReplicas.
    autoscaled = {
        "router": {**values["router"], "autoscaling": {"enabled": True, "minReplicas": 3}}
    }
    # (and an operator that does not watch the allocation's namespace: the notes warn)
    out = release.upgrade({**autoscaled, "watchNamespaces": [other]})
    assert f"WARNING: the operator does not watch {namespace}" in out
    hpa = kube.get(HPA, name, ns)["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 10)
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert kube.get(DEPLOYMENT, name, ns)["spec"]["replicas"] == 1
    assert kube.get(PDB, name, ns)["spec"]["maxUnavailable"] == 1
    # A count the HPA sets is kept by the next upgrade.
    kube.merge_patch(DEPLOYMENT, name, ns, {"spec": {"replicas": 4}})
    release.upgrade({"router": {**autoscaled["router"], "workers": 2}})
    deployment = kube.get(DEPLOYMENT, name, ns)
    assert deployment["spec"]["replicas"] == 4
    assert "--workers=2" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]

    # Uninstalling removes the router, its Role and RoleBinding in the allocation's namespace.
    release.uninstall()
    absent(lambda: kube.get(DEPLOYMENT, name, ns))
    absent(lambda: kube.get(HPA, name, ns))
    absent(lambda: kube.get(ROLE, name, namespace))
    absent(lambda: kube.get(ROLE_BINDING, name, namespace))
    assert not allowed(kube, user, verb="watch", namespace=namespace, **table)


class ModelServer:
    """A stand-in for a GPU type's engine: answers every POST with an OpenAI completion and records
    the paths it was sent. It listens on this machine's non-loopback address, since the API
    refuses loopback addresses in an EndpointSlice."""

    def __init__(self) -> None:
        self.host = own_address()
        self.paths: list[str] = []
        paths = self.paths

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                paths.append(self.path)
                body = json.dumps(
                    {
                        "id": "cmpl-1",
                        "object": "text_completion",
                        "choices": [{"index": 0, "text": " ok", "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((self.host, 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _upstream(service: str, server: ModelServer) -> list[dict[str, Any]]:
    """A GPU type's Service and the EndpointSlice its controller would write (none runs here)."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": service},
            "spec": {"ports": [{"name": "http", "port": 8000, "targetPort": server.port}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{service}-1",
                "labels": {"kubernetes.io/service-name": service},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [server.host], "conditions": {"ready": True}}],
            "ports": [{"name": "http", "port": server.port, "protocol": "TCP"}],
        },
    ]


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status), json.loads(response.read())


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_router_routes_the_table_the_operator_publishes_with_the_charts_permissions(
    kube: Kube, release: Release, namespace: str, tmp_path: Path
) -> None:
    """The chart's two parts together, each with exactly the permissions the chart grants: the
    operator (its Deployment's arguments, its ServiceAccount's token) publishes an allocation's
    routing table, which router.enabled alone lets it write; the router (its Deployment's
    arguments, its own token) follows that ConfigMap and the upstream Services' EndpointSlices,
    becomes ready, and sends a request to a model server."""
    values = {
        "watchNamespaces": [namespace],
        "router": {"enabled": True, "allocation": {"name": "chat", "namespace": namespace}},
    }
    release.install(values)
    server = ModelServer()
    kube.deployment("pool-l4", namespace, replicas=5)
    kube.machine_deployment("pool-a100", namespace, replicas=5)
    spec = copy.deepcopy(SPEC)
    spec["routing"] = {"publishConfigMap": True}
    for gpu in spec["gpus"]:
        service = f"llm-{gpu['name'].lower()}"
        gpu["upstream"] = {"service": service, "port": "http"}
        for body in _upstream(service, server):
            kube.create(body, namespace)

    deployment = kube.get(DEPLOYMENT, release.fullname, release.namespace)
    operator = OperatorRun(
        release.kubeconfig(kube, tmp_path / "operator.kubeconfig"),
        deployment,
        tmp_path / "operator.log",
    )
    router_name = f"{release.fullname}-router"
    router = RouterRun(
        release.kubeconfig(kube, tmp_path / "router.kubeconfig", service_account=router_name),
        kube.get(DEPLOYMENT, router_name, release.namespace),
        tmp_path / "router.log",
    )
    assert router.args[2] == f"--table-configmap={namespace}/chat-routing"
    operator.start()
    router.start()  # before the table exists: live, not ready
    try:
        assert _status(f"{router.url}/readyz") == 503
        kube.create(allocation("chat", spec), namespace)

        def published() -> dict[str, Any]:
            condition = kube.condition("chat", namespace, "RoutingPublished")
            assert condition is not None
            assert condition["status"] == "True", condition
            return kube.get(("v1", "ConfigMap"), "chat-routing", namespace)

        config_map = eventually(published, timeout=90)
        table = json.loads(config_map["data"]["table.json"])
        # Each type's Service, in the allocation's namespace (said, or the table's own).
        assert {
            gpu: (up["service"], up["port"], up.get("namespace", namespace))
            for gpu, up in table["upstreams"].items()
        } == {"L4": ("llm-l4", "http", namespace), "A100": ("llm-a100", "http", namespace)}
        eventually(lambda: equal(_status(f"{router.url}/readyz"), 200), timeout=30)
        status, answer = _post(
            f"{router.url}/v1/completions",
            {"model": "llama", "prompt": "hello there", "max_tokens": 4},
        )
        assert (status, answer["choices"][0]["text"]) == (200, " ok")
        assert server.paths == ["/v1/completions"]
    finally:
        router.stop()
        operator.stop()
        server.close()
        kube.delete(Kinds.allocation, "chat", namespace)
        print(f"--- router log (tail) ---\n{router.log()[-4000:]}")
        print(f"--- operator log (tail) ---\n{operator.log()[-4000:]}")
    assert not re.findall(r".*(?:forbidden|\b403\b).*", router.log(), re.IGNORECASE)
    assert not refusals(operator.log(), namespace, expected="")
