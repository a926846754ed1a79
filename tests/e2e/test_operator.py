"""The operator end to end: a real kube-apiserver, the real CRD, `melange run` as a process."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.dynamic.exceptions import UnprocessibleEntityError

from melange import api
from melange.plan import solver
from tests.specs import with_value

from .kube import CRD_FILE, REPO, Kinds, Kube, eventually, reasons
from .operator_process import OperatorProcess

pytestmark = pytest.mark.e2e

SPEC: dict[str, Any] = {
    "buckets": {"inputTokens": [1, 100, 1000, 16000], "outputTokens": [1, 100, 1000]},
    "workload": {"distribution": [[16, 6], [6, 3], [2, 1]], "totalRate": 34},
    "sliceFactor": 8,
    "gpus": [
        {
            "name": "L4",
            "costPerHour": 0.8,
            "throughput": [[20, 6], [8, 2], [1, 0]],
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pool-l4"},
        },
        {
            "name": "A100",
            "costPerHour": 3.7,
            "throughput": [[60, 25], [40, 12], [10, 4]],
            "scaleTargetRef": {
                "apiVersion": "cluster.x-k8s.io/v1beta1",
                "kind": "MachineDeployment",
                "name": "pool-a100",
            },
        },
        {
            "name": "H100",
            "costPerHour": 7.5,
            "throughput": [[90, 40], [70, 20], [18, 8]],
            "scaleTargetRef": {
                "apiVersion": "test.melange.dev/v1",
                "kind": "NodePool",
                "name": "pool-h100",
            },
            "replicasPath": "/spec/size",
        },
    ],
}
TARGETS = {
    "L4": (Kinds.deployment, "pool-l4"),
    "A100": (Kinds.machine_deployment, "pool-a100"),
    "H100": (Kinds.node_pool, "pool-h100"),
}


def manifest(name: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "melange.dev/v1alpha1",
        "kind": "MelangeAllocation",
        "metadata": {"name": name},
        "spec": copy.deepcopy(spec or SPEC),
    }


def make_pools(kube: Kube, namespace: str, replicas: int = 1, skip: tuple[str, ...] = ()) -> None:
    if "L4" not in skip:
        kube.deployment("pool-l4", namespace, replicas)
    if "A100" not in skip:
        kube.machine_deployment("pool-a100", namespace, replicas)
    if "H100" not in skip:
        kube.node_pool("pool-h100", namespace, replicas)


def expected_replicas(spec: dict[str, Any]) -> dict[str, int]:
    return solver.solve_spec(api.validate_spec(spec)).replicas()


def pool_replicas(kube: Kube, namespace: str) -> dict[str, int | None]:
    return {gpu: kube.replicas(kind, name, namespace) for gpu, (kind, name) in TARGETS.items()}


def pool_versions(kube: Kube, namespace: str) -> dict[str, str]:
    return {
        gpu: kube.resource_version(kind, name, namespace) for gpu, (kind, name) in TARGETS.items()
    }


def wait_ready(
    kube: Kube, name: str, namespace: str, status: str = "True", reason: str | None = None
) -> dict[str, Any]:
    return kube.wait_condition(name, namespace, "Ready", status, reason)


def test_reconciles_every_kind_of_node_pool(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    make_pools(kube, namespace, replicas=5)
    kube.create(manifest("chat"), namespace)
    expected = expected_replicas(SPEC)
    assert expected == {"L4": 2, "A100": 1, "H100": 0}

    eventually(lambda: _assert_equal(pool_replicas(kube, namespace), expected))
    wait_ready(kube, "chat", namespace, reason="Reconciled")
    status = kube.allocation("chat", namespace)["status"]
    assert status["costPerHour"] == pytest.approx(5.3)
    assert status["totalReplicas"] == 3
    assert status["solvedRate"] == 34
    assert status["planStatus"] == "Optimal"
    assert status["lowerBound"] <= status["costPerHour"]
    best = solver.solve_spec(api.validate_spec(SPEC)).best_baseline
    assert best is not None
    assert best.cost_per_hour is not None
    assert status["singleTypeBaseline"] == {
        "name": best.gpu,
        "replicas": best.replicas,
        "costPerHour": pytest.approx(best.cost_per_hour),
    }
    assert status["savingPerHour"] == pytest.approx(best.cost_per_hour - 5.3)
    planned = {t["name"]: t["plannedReplicas"] for t in status["targets"]}
    assert planned == expected
    assert [(g["name"], g["replicas"]) for g in status["gpus"]] == [
        ("L4", 2),
        ("A100", 1),
        ("H100", 0),
    ]
    assert status["observedGeneration"] == 1
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Solved"]["status"] == "True"
    assert conditions["Scaled"]["status"] == "True"
    assert status["gpuTypes"] == 2
    for bucket in status["routing"]:
        assert sum(s["fraction"] for s in bucket["shares"]) == pytest.approx(1.0)

    def scaled_once_each() -> None:  # the Events come after the status
        scaled = [e for e in kube.events(namespace, "chat") if e["reason"] == "Scaled"]
        assert sorted(e["message"] for e in scaled) == [
            "Deployment/pool-l4 (L4): 5 -> 2 (Create)",
            "MachineDeployment/pool-a100 (A100): 5 -> 1 (Create)",
            "NodePool/pool-h100 (H100): 5 -> 0 (Create)",
        ]

    eventually(scaled_once_each, timeout=30)

    table = kube.table(namespace)
    columns = [c["name"] for c in table["columnDefinitions"]]
    assert columns == [
        "Name",
        "Ready",
        "Reason",
        "Rate Source",
        "Cost/h",
        "GPU Types",
        "Instances",
        "Rate",
        "Age",
    ]
    cells = table["rows"][0]["cells"]
    assert cells[:8] == ["chat", "True", "Reconciled", None, 5.3, 2, 3, 34]  # no rate source


def _assert_equal(actual: object, expected: object) -> None:
    assert actual == expected


def test_rate_change_repatches_and_restart_patches_nothing(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    make_pools(kube, namespace)
    kube.create(manifest("chat"), namespace)
    eventually(lambda: _assert_equal(pool_replicas(kube, namespace), expected_replicas(SPEC)))
    wait_ready(kube, "chat", namespace)

    doubled = copy.deepcopy(SPEC)
    doubled["workload"]["totalRate"] = 68
    kube.merge_patch(Kinds.allocation, "chat", namespace, {"spec": {"workload": {"totalRate": 68}}})
    expected = expected_replicas(doubled)
    assert expected != expected_replicas(SPEC)
    eventually(lambda: _assert_equal(pool_replicas(kube, namespace), expected))
    eventually(
        lambda: _assert_equal(
            kube.allocation("chat", namespace)["status"].get("observedGeneration"), 2
        )
    )

    versions = pool_versions(kube, namespace)
    operator.restart()
    # The restarted operator resumes the allocation (a fresh solve and status write) ...
    eventually(
        lambda: _assert_equal(
            "/chat] Reconciled (resume): Ready=True" in operator.log(since_start=2), True
        )
    )
    wait_ready(kube, "chat", namespace)
    # ... and, the pools being right already, patches none of them.
    assert pool_versions(kube, namespace) == versions
    assert pool_replicas(kube, namespace) == expected


def _without_rule(crd: dict[str, Any], text: str) -> dict[str, Any]:
    """The CRD with the spec-level CEL rule that mentions `text` left out."""
    loose = copy.deepcopy(crd)
    spec = loose["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = spec["x-kubernetes-validations"]
    spec["x-kubernetes-validations"] = [r for r in rules if text not in r["rule"]]
    assert len(spec["x-kubernetes-validations"]) == len(rules) - 1
    return loose


def _create_accepted(kube: Kube, body: dict[str, Any], namespace: str) -> None:
    """Create; a refusal by the rule just removed means the API server has not caught up yet."""
    try:
        kube.create(body, namespace)
    except UnprocessibleEntityError as exc:
        raise AssertionError(str(exc)) from None


def test_an_allocation_stored_before_a_stricter_crd_sets_condition_and_touches_nothing(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    """The API server refuses a zero distribution today; one stored under an older CRD without
    that rule is still read, and the operator refuses it the same way (its model and the CRD agree)."""
    make_pools(kube, namespace, replicas=4)
    versions = pool_versions(kube, namespace)
    bad = copy.deepcopy(SPEC)
    bad["workload"]["distribution"] = [[0, 0], [0, 0], [0, 0]]
    (crd,) = [d for d in yaml.safe_load_all(CRD_FILE.read_text()) if d]
    try:
        kube.apply(_without_rule(crd, "distribution.exists"))
        eventually(lambda: _create_accepted(kube, manifest("bad", bad), namespace))
    finally:
        kube.apply(crd)
        kube.wait_established(crd["metadata"]["name"])
    condition = wait_ready(kube, "bad", namespace, status="False", reason="InvalidSpec")
    assert (
        condition["message"]
        == "spec.workload.distribution: must have a positive sum when totalRate > 0"
    )
    warnings = [
        e for e in kube.wait_events(namespace, "bad", "InvalidSpec") if e["type"] == "Warning"
    ]
    assert reasons(warnings) == ["InvalidSpec"]
    assert pool_versions(kube, namespace) == versions


def test_infeasible_spec_sets_condition_and_touches_nothing(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    make_pools(kube, namespace, replicas=4)
    versions = pool_versions(kube, namespace)
    capped = copy.deepcopy(SPEC)
    for gpu in capped["gpus"]:
        gpu["maxReplicas"] = 0
    kube.create(manifest("capped", capped), namespace)
    condition = wait_ready(kube, "capped", namespace, status="False", reason="Infeasible")
    assert condition["message"].startswith(
        "the demand of 34 req/s does not fit within maxReplicas of L4"
    )
    kube.wait_events(namespace, "capped", "Infeasible")
    assert pool_versions(kube, namespace) == versions


def test_missing_target_others_still_scaled(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    make_pools(kube, namespace, replicas=0, skip=("A100",))
    kube.create(manifest("partial"), namespace)
    condition = wait_ready(kube, "partial", namespace, status="False", reason="ScaleFailed")
    assert "MachineDeployment/pool-a100 (A100): not found in namespace" in condition["message"]
    eventually(lambda: _assert_equal(kube.replicas(Kinds.deployment, "pool-l4", namespace), 2))
    scaled = kube.condition("partial", namespace, "Scaled")
    assert scaled is not None
    assert scaled["status"] == "False"
    # Once the missing pool exists, the retry brings it to the plan.
    kube.machine_deployment("pool-a100", namespace, 0)
    eventually(
        lambda: _assert_equal(kube.replicas(Kinds.machine_deployment, "pool-a100", namespace), 1),
        timeout=90,
    )
    wait_ready(kube, "partial", namespace, reason="Reconciled")


def test_dry_run_patches_nothing(kube: Kube, namespace: str, operator: OperatorProcess) -> None:
    make_pools(kube, namespace, replicas=7)
    versions = pool_versions(kube, namespace)
    spec = copy.deepcopy(SPEC)
    spec["dryRun"] = True
    kube.create(manifest("preview", spec), namespace)
    wait_ready(kube, "preview", namespace, reason="DryRun")
    status = kube.allocation("preview", namespace)["status"]
    assert status["costPerHour"] == pytest.approx(5.3)
    assert pool_versions(kube, namespace) == versions
    assert set(pool_replicas(kube, namespace).values()) == {7}


def test_fifty_allocations_all_reach_ready(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    spec = copy.deepcopy(SPEC)
    spec["dryRun"] = True
    for k in range(50):
        kube.create(manifest(f"a{k:02d}", spec), namespace)

    def all_ready() -> None:
        table = kube.table(namespace)
        ready = [row["cells"][1] for row in table["rows"]]
        assert len(ready) == 50
        assert set(ready) == {"True"}, ready

    eventually(all_ready, timeout=180, interval=1.0)


# -- what the API server itself accepts and rejects ------------------------------------------


@pytest.mark.parametrize(
    "example", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name
)
def test_examples_are_accepted(kube: Kube, namespace: str, example: Path) -> None:
    created = kube.create(yaml.safe_load(example.read_text()), namespace)
    assert created["spec"]["sliceFactor"] == 8


def _rejected(kube: Kube, namespace: str, spec: dict[str, Any]) -> str:
    """The API server's own message for the rejected object (Status.message, decoded)."""
    with pytest.raises(UnprocessibleEntityError) as info:
        kube.create(manifest("rejected", spec), namespace)
    return str(json.loads(str(info.value.body))["message"])


def _mutated(path: str, value: Any) -> dict[str, Any]:
    return with_value(SPEC, path, value)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            "workload.distribution",
            [[1, 1]],
            "workload.distribution must have one row per input bucket",
        ),
        (
            "workload.distribution",
            [[1], [1], [1]],
            "every workload.distribution row must have one value per output bucket",
        ),
        (
            "gpus.0.throughput",
            [[1, 1]],
            "every gpus[].throughput must have one row per input bucket",
        ),
        (
            "gpus.1.throughput",
            [[1, 1], [1, 1], [1]],
            "every gpus[].throughput row must have one value per output bucket",
        ),
        (
            "gpus.0.minReplicas",
            3,
            "spec.gpus[0].maxReplicas: Invalid value: minReplicas must be <= maxReplicas",
        ),
        (
            "buckets.inputTokens",
            [1, 1000, 100, 16000],
            "buckets.inputTokens must be strictly increasing",
        ),
        ("buckets.outputTokens", [1, 100, 100], "Duplicate value: 100"),
        ("gpus.1.name", "L4", 'spec.gpus[1]: Duplicate value: {"name":"L4"}'),
        ("gpus", [], "should have at least 1 items"),
        ("gpus.0.costPerHour", 0, "should be greater than 0"),
        ("sliceFactor", 2000, "should be less than or equal to 1024"),
    ],
)
def test_api_server_rejects_with_message(
    kube: Kube, namespace: str, path: str, value: Any, message: str
) -> None:
    spec = _mutated(path, value)
    if path == "gpus.0.minReplicas":
        spec["gpus"][0]["maxReplicas"] = 2
    assert message in _rejected(kube, namespace, spec)


def test_metrics_report_the_plan(kube: Kube, namespace: str, operator: OperatorProcess) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    make_pools(kube, namespace, replicas=0, skip=("A100",))
    kube.create(manifest("chat"), namespace)
    wait_ready(kube, "chat", namespace, status="False", reason="ScaleFailed")

    def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        result = {}
        for family in text_string_to_metric_families(operator.metrics()):
            for sample in family.samples:
                if sample.labels.get("namespace") == namespace:
                    labels = tuple(
                        sorted(
                            (k, v)
                            for k, v in sample.labels.items()
                            if k not in {"namespace", "allocation"}
                        )
                    )
                    result[sample.name, labels] = sample.value
        return result

    def check() -> None:
        values = samples()
        assert values["melange_plan_replicas", (("gpu", "L4"),)] == 2
        assert values["melange_plan_replicas", (("gpu", "A100"),)] == 1
        assert values["melange_plan_replicas", (("gpu", "H100"),)] == 0
        assert values["melange_plan_cost_per_hour", ()] == pytest.approx(5.3)
        assert values["melange_solved_request_rate", ()] == 34
        lower_bound = values["melange_plan_lower_bound_cost_per_hour", ()]
        assert lower_bound <= values["melange_plan_cost_per_hour", ()]
        assert lower_bound == pytest.approx(5.3)  # proven optimal: the bound meets the cost
        assert values["melange_solves_total", (("result", "optimal"), ("trigger", "create"))] >= 1
        assert values["melange_scale_patches_total", (("gpu", "L4"), ("result", "patched"))] == 1
        assert values["melange_scale_patches_total", (("gpu", "A100"), ("result", "failed"))] >= 1
        assert values["melange_errors_total", (("reason", "ScaleFailed"),)] >= 1
        assert values["melange_solve_duration_seconds_count", ()] >= 1

    eventually(check)
