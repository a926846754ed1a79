"""The operator owns its pools: outside changes set back (or only reported), one owner per target,
namespaced allocations confined to their namespace; against the real API server."""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.controlplane.harness import ControlPlane

from .kube import Kinds, Kube, eventually, reasons
from .operator_process import OperatorProcess
from .test_operator import (
    SPEC,
    expected_replicas,
    make_pools,
    manifest,
    pool_replicas,
    pool_versions,
    wait_ready,
)

pytestmark = pytest.mark.e2e
RESYNC = 3  # the operator fixture's --resync-seconds


def _equal(actual: object, expected: object) -> None:
    assert actual == expected


def _outside_changes(operator: OperatorProcess, action: str) -> float:
    pattern = rf'^melange_outside_changes_total\{{.*action="{action}".*\}} (\S+)$'
    found = re.findall(pattern, operator.metrics(), flags=re.M)
    return sum(float(v) for v in found)


def test_an_outside_change_is_set_back_within_one_interval(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    make_pools(kube, namespace)
    kube.create(manifest("chat"), namespace)
    wait_ready(kube, "chat", namespace)
    planned = expected_replicas(SPEC)

    kube.merge_patch(Kinds.deployment, "pool-l4", namespace, {"spec": {"replicas": 9}})
    eventually(lambda: _equal(pool_replicas(kube, namespace), planned), timeout=2 * RESYNC + 10)

    events = [
        e
        for e in kube.wait_events(namespace, "chat", "OutsideChange")
        if e["reason"] == "OutsideChange"
    ]
    assert len(events) == 1
    assert events[0]["type"] == "Warning"
    assert events[0]["message"] == (
        f"Deployment/pool-l4 (L4) was changed from {planned['L4']} to 9 by another writer; "
        f"set back to {planned['L4']}"
    )
    assert _outside_changes(operator, "reverted") == 1
    status = kube.allocation("chat", namespace)["status"]
    last = status["recentPatches"][0]
    assert (last["name"], last["from"], last["to"], last["reason"]) == (
        "L4",
        9,
        planned["L4"],
        "OutsideChange",
    )
    wait_ready(kube, "chat", namespace)


def test_observe_policy_reports_the_change_and_leaves_the_pool(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    make_pools(kube, namespace)
    spec = copy.deepcopy(SPEC)
    spec["gpus"][0]["policy"] = "Observe"
    kube.create(manifest("chat", spec), namespace)
    wait_ready(kube, "chat", namespace)
    planned = expected_replicas(SPEC)

    kube.merge_patch(Kinds.deployment, "pool-l4", namespace, {"spec": {"replicas": 9}})
    condition = kube.wait_condition("chat", namespace, "Ready", "False", "OutsideChange")
    assert condition["message"] == (
        f"Deployment/pool-l4 (L4) is at 9, the plan says {planned['L4']} (policy Observe)"
    )
    eventually(lambda: _equal(_outside_changes(operator, "observed"), 1.0))
    versions = pool_versions(kube, namespace)
    # several intervals later: still left alone, and reported once
    seen = _reconciles(operator, "chat")
    eventually(lambda: _equal(_reconciles(operator, "chat") >= seen + 3, True), timeout=30)
    assert pool_versions(kube, namespace) == versions
    reports = [e for e in kube.events(namespace, "chat") if "by another writer" in e["message"]]
    assert [e["reason"] for e in reports] == ["OutsideChange"]

    # a new plan is still applied to an observed pool
    doubled = copy.deepcopy(spec)
    doubled["workload"]["totalRate"] = 68
    kube.merge_patch(Kinds.allocation, "chat", namespace, {"spec": {"workload": {"totalRate": 68}}})
    expected = expected_replicas(doubled)
    assert expected["L4"] != 9
    eventually(lambda: _equal(pool_replicas(kube, namespace), expected))
    wait_ready(kube, "chat", namespace)


def _second_on_the_pools_of_first(
    kube: Kube, namespace: str
) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
    """ "first" Ready on its pools, then "second" (another rate) on the same ones: the pools'
    versions before "second", its spec, and its TargetConflict condition."""
    make_pools(kube, namespace)
    kube.create(manifest("first"), namespace)
    wait_ready(kube, "first", namespace)
    versions = pool_versions(kube, namespace)
    other = copy.deepcopy(SPEC)
    other["workload"]["totalRate"] = 68
    kube.create(manifest("second", other), namespace)
    condition = kube.wait_condition("second", namespace, "Ready", "False", "TargetConflict")
    return versions, other, condition


def test_a_second_allocation_on_the_same_pools_patches_nothing(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    versions, other, condition = _second_on_the_pools_of_first(kube, namespace)
    assert condition["message"].startswith(
        f"Deployment/pool-l4 in namespace {namespace} belongs to MelangeAllocation "
        f"{namespace}/first"
    )
    assert condition["message"].endswith("nothing was patched")
    warnings = [
        e for e in kube.wait_events(namespace, "second", "TargetConflict") if e["type"] == "Warning"
    ]
    assert reasons(warnings) == ["TargetConflict"]
    # several intervals: the pools never flap between the two plans
    eventually(lambda: _equal(_reconciles(operator, "second") >= 3, True), timeout=30)
    assert pool_versions(kube, namespace) == versions
    assert kube.condition("first", namespace, "Ready")["status"] == "True"  # type: ignore[index]

    # the owner goes: the second takes the pools over
    kube.delete(Kinds.allocation, "first", namespace)
    wait_ready(kube, "second", namespace)
    assert pool_replicas(kube, namespace) == expected_replicas(other)


def test_an_owner_that_moves_to_other_pools_leaves_them_to_the_next(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    _, other, _ = _second_on_the_pools_of_first(kube, namespace)

    # the owner's spec now names other pools (that do not exist): its claim on these is gone
    moved = copy.deepcopy(SPEC["gpus"])
    for gpu in moved:
        gpu["scaleTargetRef"]["name"] += "-moved"
    kube.merge_patch(Kinds.allocation, "first", namespace, {"spec": {"gpus": moved}})
    wait_ready(kube, "second", namespace)
    assert pool_replicas(kube, namespace) == expected_replicas(other)


def test_at_start_no_pool_is_patched_before_every_allocation_is_seen(
    control_plane: ControlPlane, kube: Kube, namespace: str, tmp_path: Path
) -> None:
    """Allocations made while no operator runs: the one created first owns the pools, whatever
    order the watch lists them in ("late-*" sort before "owner"), and nothing is written to them.
    An operator acting on a partial view could patch them to a later one's plan before it saw
    the owner; nine objects come faster than a reconcile reaches its ownership check, so that
    race is held open in tests/unit/test_controller_sync.py."""
    planned = expected_replicas(SPEC)
    kube.deployment("pool-l4", namespace, planned["L4"])  # the owner's plan already
    kube.machine_deployment("pool-a100", namespace, planned["A100"])
    kube.node_pool("pool-h100", namespace, planned["H100"])
    kube.create(manifest("owner"), namespace)
    time.sleep(1.1)  # creation times have whole seconds: the later ones are later
    other = copy.deepcopy(SPEC)
    other["workload"]["totalRate"] = 68
    assert expected_replicas(other) != planned
    late = [f"late-{k}" for k in range(8)]
    for name in late:
        kube.create(manifest(name, other), namespace)
    versions = pool_versions(kube, namespace)

    process = OperatorProcess(control_plane, namespace, tmp_path, identity="fresh")
    process.start()
    try:
        wait_ready(kube, "owner", namespace)
        for name in late:
            kube.wait_condition(name, namespace, "Ready", "False", "TargetConflict")
        assert pool_versions(kube, namespace) == versions  # never written: already at the plan
        assert "The watch shows every allocation (9); reconciling" in process.log()
    finally:
        process.stop()
        print(f"--- operator log (tail) ---\n{process.log()[-8000:]}")


def _reconciles(operator: OperatorProcess, name: str) -> int:
    return operator.log().count(f"/{name}] Reconciled (")


def test_cluster_scoped_targets_need_the_allow_list(
    control_plane: ControlPlane, kube: Kube, namespace: str, tmp_path: Path
) -> None:
    nodepool = f"gpu-{namespace}"
    kube.apply(
        {
            "apiVersion": "karpenter.sh/v1",
            "kind": "NodePool",
            "metadata": {"name": nodepool},
            "spec": {"replicas": 1},
        }
    )
    spec = copy.deepcopy(SPEC)
    spec["gpus"][2] = {
        **{k: v for k, v in spec["gpus"][2].items() if k != "replicasPath"},
        "scaleTargetRef": {"apiVersion": "karpenter.sh/v1", "kind": "NodePool", "name": nodepool},
    }
    make_pools(kube, namespace, skip=("H100",))
    versions = _namespaced_pool_versions(kube, namespace)

    closed = OperatorProcess(control_plane, namespace, tmp_path, identity="closed")
    closed.start()
    try:
        kube.create(manifest("chat", spec), namespace)
        condition = kube.wait_condition("chat", namespace, "Ready", "False", "TargetNotAllowed")
        assert condition["message"] == (
            f"NodePool/{nodepool} (H100): nodepools.karpenter.sh is cluster-scoped and not in the "
            "operator's allow-list (--allow-cluster-scoped); nothing was patched"
        )
        assert _namespaced_pool_versions(kube, namespace) == versions
        assert _karpenter_replicas(kube, nodepool) == 1
    finally:
        closed.stop()

    allowed = OperatorProcess(
        control_plane,
        namespace,
        tmp_path,
        identity="allowed",
        extra_args=("--allow-cluster-scoped", "nodepools.karpenter.sh"),
    )
    allowed.start()
    try:
        wait_ready(kube, "chat", namespace)
        planned = expected_replicas(spec)
        assert _karpenter_replicas(kube, nodepool) == planned["H100"]
    finally:
        allowed.stop()
        kube.dynamic.delete(kube.resource(("karpenter.sh/v1", "NodePool")), name=nodepool)


def _namespaced_pool_versions(kube: Kube, namespace: str) -> dict[str, str]:
    """The L4 and A100 pools' resourceVersions (H100 is the cluster-scoped NodePool here)."""
    return {
        "L4": kube.resource_version(Kinds.deployment, "pool-l4", namespace),
        "A100": kube.resource_version(Kinds.machine_deployment, "pool-a100", namespace),
    }


def _karpenter_replicas(kube: Kube, name: str) -> int:
    obj = kube.dynamic.get(kube.resource(("karpenter.sh/v1", "NodePool")), name=name)
    return int(obj.to_dict()["spec"]["replicas"])
