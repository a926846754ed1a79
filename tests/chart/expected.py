"""What the chart must produce, shared by the template tests and the install tests."""

from __future__ import annotations

from typing import Any

from .helm import RELEASE

SELECTOR = {"app.kubernetes.io/name": "melange-operator", "app.kubernetes.io/instance": RELEASE}
LABELS = {
    **SELECTOR,
    "app.kubernetes.io/version": "0.1.0",
    "app.kubernetes.io/managed-by": "Helm",
    "helm.sh/chart": "melange-operator-0.1.0",
}
# The operator's own needs: Kopf lists and watches allocations (and writes nothing to them), the
# operator writes their status and posts core v1 Events (patch: updates of an Event series).
BASE_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": ["melange.dev"],
        "resources": ["melangeallocations"],
        "verbs": ["list", "watch"],
    },
    {"apiGroups": ["melange.dev"], "resources": ["melangeallocations/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
]
# ... plus the default scale targets: Deployments and Cluster API MachineDeployments.
DEFAULT_RULES: list[dict[str, Any]] = [
    *BASE_RULES,
    {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["get", "patch"]},
    # the objects themselves, read only: make-before-break reads their ready count
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]},
    {
        "apiGroups": ["cluster.x-k8s.io"],
        "resources": ["machinedeployments/scale"],
        "verbs": ["get", "patch"],
    },
    {"apiGroups": ["cluster.x-k8s.io"], "resources": ["machinedeployments"], "verbs": ["get"]},
]


def lease_rules(lease: str) -> list[dict[str, Any]]:
    """The leader-election Role in the release namespace: create any Lease (RBAC cannot restrict
    create by name), get and update only the release's own."""
    return [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [lease],
            "verbs": ["get", "update"],
        },
    ]


def leader_args(lease: str) -> list[str]:
    """The Deployment's leader-election flags; the kubelet expands $(VAR) from the pod's env."""
    return [
        "--leader-elect",
        f"--lease-name={lease}",
        "--lease-namespace=$(POD_NAMESPACE)",
        "--identity=$(POD_NAME)",
    ]


# The router (router.enabled): its own app.kubernetes.io/name, so that no selector of the operator
# matches it, nor its selectors the operator.
ROUTER_SELECTOR = {
    "app.kubernetes.io/name": "melange-operator-router",
    "app.kubernetes.io/instance": RELEASE,
}
ROUTER_LABELS = {
    **ROUTER_SELECTOR,
    "app.kubernetes.io/component": "router",
    "app.kubernetes.io/part-of": "melange-operator",
    "app.kubernetes.io/version": "0.1.0",
    "app.kubernetes.io/managed-by": "Helm",
    "helm.sh/chart": "melange-operator-0.1.0",
}


def router_rules(allocation: str) -> list[dict[str, Any]]:
    """The router's Role in the allocation's namespace: its routing ConfigMap by name, the upstream
    Services, their EndpointSlices."""
    return [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [f"{allocation}-routing"],
            "verbs": ["get", "list", "watch"],
        },
        {"apiGroups": [""], "resources": ["services"], "verbs": ["get"]},
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["list", "watch"],
        },
    ]


def router_args(
    allocation: str, namespace: str, workers: int = 1, drain: int = 5, timeout: int = 45
) -> list[str]:
    """The router container's arguments before the optional ones."""
    return [
        f"--table-configmap={namespace}/{allocation}-routing",
        "--table-key=table.json",
        "--host=0.0.0.0",
        "--port=8080",
        f"--workers={workers}",
        f"--drain-seconds={drain}",
        f"--shutdown-timeout={timeout}",
    ]


def publisher_rules(allocation: str) -> list[dict[str, Any]]:
    """The operator's Role in the router's allocation's namespace: publish its routing table."""
    return [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [f"{allocation}-routing"],
            "verbs": ["get", "update", "delete"],
        },
    ]
