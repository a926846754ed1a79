"""The operator runs as a ServiceAccount whose RBAC forbids patching one of the pools.

Its Role is the chart's rules for these pools, except that the MachineDeployment's /scale may be
read but not patched. The allocation must say which pool and which verb, once (a Warning Event),
the other pools must still be scaled, and the refused patch must be retried at the documented pace,
not in a tight loop; granting the verb lets the next retry through.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from melange.controller.loop import SCALE_RETRY_SECONDS
from tests.controlplane.harness import ControlPlane
from tests.e2e.kube import Kube, eventually
from tests.e2e.operator_process import RESYNC_SECONDS as RESYNC
from tests.e2e.operator_process import OperatorProcess
from tests.e2e.test_operator import make_pools, manifest, pool_replicas, wait_ready

from . import audit
from .plans import equal, plan_at, spec_at

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

ACCOUNT = "melange-restricted"
WINDOW = 2 * SCALE_RETRY_SECONDS + 5  # seconds over which refused patches are counted


def role(namespace: str, patch_machine_deployments: bool) -> dict[str, Any]:
    scale_verbs = ["get", "patch"] if patch_machine_deployments else ["get"]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": ACCOUNT, "namespace": namespace},
        "rules": [
            {
                "apiGroups": ["melange.dev"],
                "resources": ["melangeallocations"],
                "verbs": ["list", "watch"],
            },
            {
                "apiGroups": ["melange.dev"],
                "resources": ["melangeallocations/status"],
                "verbs": ["patch"],
            },
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
            {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["get", "patch"]},
            {
                "apiGroups": ["cluster.x-k8s.io"],
                "resources": ["machinedeployments/scale"],
                "verbs": scale_verbs,
            },
            {
                "apiGroups": ["test.melange.dev"],
                "resources": ["nodepools"],
                "verbs": ["get", "patch"],
            },
            {
                "apiGroups": ["coordination.k8s.io"],
                "resources": ["leases"],
                "verbs": ["create", "get", "update"],
            },
        ],
    }


@pytest.fixture
def restricted(
    control_plane: ControlPlane, kube: Kube, namespace: str, tmp_path: Path
) -> OperatorProcess:
    kubeconfig = control_plane.service_account_kubeconfig(namespace, ACCOUNT)
    kube.apply(role(namespace, patch_machine_deployments=False), namespace)
    kube.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": ACCOUNT, "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ACCOUNT},
            "subjects": [{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": namespace}],
        },
        namespace,
    )
    return OperatorProcess(
        control_plane.as_identity(kubeconfig),
        namespace,
        tmp_path,
        identity="restricted",
        extra_args=("--resync-seconds", str(RESYNC)),
    )


def test_a_forbidden_pool_is_reported_once_retried_slowly_and_the_others_scaled(
    kube: Kube, namespace: str, restricted: OperatorProcess
) -> None:
    make_pools(kube, namespace, replicas=5)
    plan = plan_at(34)
    assert all(value != 5 for value in plan.values())  # every pool needs a patch
    restricted.start()
    try:
        kube.create(manifest("chat", spec_at(34)), namespace)
        condition = kube.wait_condition("chat", namespace, "Ready", "False", "ScaleFailed")
        start = time.time()
        message = condition["message"]
        assert "MachineDeployment/pool-a100 (A100)" in message, message
        assert "forbidden" in message, message
        assert 'cannot patch resource "machinedeployments/scale"' in message, message
        assert "pool-l4" not in message, message
        assert "pool-h100" not in message, message
        # the other pools are scaled; the forbidden one is left as it was
        eventually(lambda: equal(pool_replicas(kube, namespace), {**plan, "A100": 5}), timeout=30)

        time.sleep(WINDOW)
        end = time.time()
        patches = audit.pool_patches(restricted.writes(), namespace)
        denied = [e for e in audit.between(patches, start, end) if audit.code(e) == 403]
        others = audit.between(audit.succeeded(patches), start, end)
        print(f"pool writes: {audit.patched_values(patches)}")
        print(f"refused patches of pool-a100 in {end - start:.0f} s: {len(denied)}")
        assert {audit.pool(e) for e in denied} <= {"pool-a100"}
        # retried at most once per retry interval (a tight loop would be hundreds)
        bound = int((end - start) / SCALE_RETRY_SECONDS) + 1
        assert len(denied) <= bound, f"{len(denied)} refused patches in {end - start:.0f} s"
        assert others == [], "pools already at the plan were patched again"
        # ... and still retried: another attempt comes
        refused = len(_denied(restricted, namespace))
        eventually(
            lambda: equal(len(_denied(restricted, namespace)) > refused, True),
            timeout=3 * SCALE_RETRY_SECONDS,
        )
        # one Warning Event for the change of Ready, not one per retry
        warnings = [
            e for e in kube.wait_events(namespace, "chat", "ScaleFailed") if e["type"] == "Warning"
        ]
        assert [(e["reason"], e["message"]) for e in warnings] == [("ScaleFailed", message)]

        # granting the verb: the next retry gets through
        kube.apply(role(namespace, patch_machine_deployments=True), namespace)
        eventually(
            lambda: equal(pool_replicas(kube, namespace), plan), timeout=4 * SCALE_RETRY_SECONDS
        )
        wait_ready(kube, "chat", namespace)
    finally:
        restricted.stop()
        print(f"--- operator log (tail) ---\n{restricted.log()[-8000:]}")


def _denied(operator: OperatorProcess, namespace: str) -> list[audit.Event]:
    return [e for e in audit.pool_patches(operator.writes(), namespace) if audit.code(e) == 403]
