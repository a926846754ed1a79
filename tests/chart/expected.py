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
