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
# The operator's own needs: Kopf lists, watches and annotates allocations, the operator writes their
# status, and Kopf posts core v1 Events.
BASE_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": ["melange.dev"],
        "resources": ["melangeallocations"],
        "verbs": ["list", "watch", "patch"],
    },
    {"apiGroups": ["melange.dev"], "resources": ["melangeallocations/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]
# ... plus the default scale targets: Deployments and Cluster API MachineDeployments.
DEFAULT_RULES: list[dict[str, Any]] = [
    *BASE_RULES,
    {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["get", "patch"]},
    {
        "apiGroups": ["cluster.x-k8s.io"],
        "resources": ["machinedeployments/scale"],
        "verbs": ["get", "patch"],
    },
]
