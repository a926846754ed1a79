"""The operator's pure decisions: conditions, target replicas, status."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from melange import api
from melange.api import conditions
from melange.api.conditions import Condition
from melange.controller import decide
from melange.plan import solver
from melange.plan.result import BucketAssignment, GpuResult, Plan, Share

CRD_FILE = Path(__file__).parents[2] / "crds" / "melangeallocations.melange.dev.yaml"

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def spec(**gpu_overrides: Any) -> api.AllocationSpec:
    gpus = [
        {
            "name": "L4",
            "costPerHour": 0.8,
            "throughput": [[20, 6], [8, 2]],
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "l4"},
        },
        {
            "name": "A100",
            "costPerHour": 3.7,
            "throughput": [[60, 25], [40, 12]],
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "a100"},
            **gpu_overrides,
        },
    ]
    return api.validate_spec(
        {
            "buckets": {"inputTokens": [1, 100, 1000], "outputTokens": [1, 100, 1000]},
            "workload": {"distribution": [[16, 6], [6, 3]], "totalRate": 31},
            "gpus": gpus,
        }
    )


def test_condition_keeps_transition_time_while_status_holds() -> None:
    first = conditions.set_conditions(None, [Condition("Ready", "True", "Reconciled", "ok")], 1, T0)
    later = T0 + timedelta(minutes=5)
    second = conditions.set_conditions(
        first, [Condition("Ready", "True", "Reconciled", "still ok")], 2, later
    )
    assert second == [
        {
            "type": "Ready",
            "status": "True",
            "observedGeneration": 2,
            "lastTransitionTime": "2026-01-02T03:04:05Z",
            "reason": "Reconciled",
            "message": "still ok",
        }
    ]
    third = conditions.set_conditions(
        second, [Condition("Ready", "False", "Infeasible", "no")], 3, later
    )
    assert third[0]["lastTransitionTime"] == "2026-01-02T03:09:05Z"


def test_conditions_are_ordered_and_others_kept() -> None:
    existing = [{"type": "RateObserved", "status": "True", "reason": "Observed", "message": ""}]
    result = conditions.set_conditions(
        existing,
        [Condition("Scaled", "True", "Scaled", ""), Condition("Ready", "True", "Reconciled", "")],
        1,
        T0,
    )
    assert [c["type"] for c in result] == ["Ready", "Scaled", "RateObserved"]


def test_transitioned_on_status_or_reason_only() -> None:
    before = [{"type": "Ready", "status": "False", "reason": "InvalidSpec", "message": "a"}]
    assert not conditions.transitioned(before, Condition("Ready", "False", "InvalidSpec", "b"))
    assert conditions.transitioned(before, Condition("Ready", "False", "Infeasible", "a"))
    assert conditions.transitioned(before, Condition("Ready", "True", "InvalidSpec", "a"))
    assert conditions.transitioned(None, Condition("Ready", "True", "Reconciled", ""))


def _plan(**replicas: int) -> Plan:
    return Plan(
        status="Optimal",
        gpus=tuple(GpuResult(name, n, n * 1.0, 0.5, n / 2) for name, n in replicas.items()),
    )


def test_desired_replicas_respect_bounds() -> None:
    bounded = spec(minReplicas=3, maxReplicas=5)
    assert decide.desired_replicas(bounded, _plan(L4=2, A100=9)) == {"L4": 2, "A100": 5}
    assert decide.desired_replicas(bounded, _plan(L4=0, A100=1)) == {"L4": 0, "A100": 3}
    assert decide.desired_replicas(bounded, _plan(L4=4)) == {"L4": 4, "A100": 3}


def test_an_allocation_object_needs_a_scale_target_a_bare_spec_does_not() -> None:
    allocation = spec(scaleTargetRef=None)
    errors = api.resource_errors(allocation)
    assert [str(e) for e in errors] == ["spec.gpus[1].scaleTargetRef: is required"]
    manifest = {
        "apiVersion": "melange.dev/v1alpha1",
        "kind": "MelangeAllocation",
        "metadata": {"name": "chat"},
        "spec": allocation.model_dump(by_alias=True, exclude_none=True),
    }
    with pytest.raises(api.SpecError) as caught:
        api.parse_document(manifest)  # what `melange solve` reads: refused as the API server does
    assert [str(e) for e in caught.value.errors] == ["spec.gpus[1].scaleTargetRef: is required"]
    assert api.parse_document({"spec": manifest["spec"]}).spec == allocation


def test_plan_status_fields() -> None:
    plan = solver.solve_spec(spec())
    status = decide.plan_status(plan, T0)
    assert status["planStatus"] == "Optimal"
    assert status["totalReplicas"] == 1  # one A100 (3.70/h) beats five L4s (4.00/h)
    assert status["gpuTypes"] == 1
    assert status["solvedRate"] == 31
    assert status["lastSolveTime"] == "2026-01-02T03:04:05Z"
    assert [g["name"] for g in status["gpus"]] == ["L4", "A100"]
    assert {s["gpu"] for b in status["routing"] for s in b["shares"]} == {"A100"}
    assert status["routingOmitted"] is None


def test_a_routing_table_too_large_for_the_status_is_left_out_with_a_note() -> None:
    """Every one of 32 x 32 buckets split between 16 types of 63-character names: more than the
    status keeps. The table is deleted (None in a merge patch), and the status says why."""
    names = [f"{k:02d}" + "g" * 61 for k in range(16)]
    shares = tuple(Share(name, 64, 0.0625) for name in names)
    plan = Plan(
        status="Optimal",
        gpus=tuple(GpuResult(name, 1, 1.0, 0.5, 0.5) for name in names),
        cost_per_hour=16.0,
        assignment=tuple(
            BucketAssignment((i + 1, i + 2), (j + 1, j + 2), 1.0 / 3, shares)
            for i in range(32)
            for j in range(32)
        ),
    )
    status = decide.plan_status(plan, T0)
    assert status["routing"] is None
    assert "1024 buckets" in status["routingOmitted"]
    assert f"more than the {decide.MAX_ROUTING_BYTES}" in status["routingOmitted"]
    assert status["totalReplicas"] == 16


def test_kubectl_describe_prints_the_conditions_first() -> None:
    """`kubectl describe` prints a custom resource's fields sorted by name: every other status
    field must sort after `conditions`, so the conditions come before the per-bucket lists."""
    crd = yaml.safe_load(CRD_FILE.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    fields = sorted(schema["properties"]["status"]["properties"])
    assert fields[0] == "conditions", fields


def test_plan_conditions_summarise_outcomes() -> None:
    plan = solver.solve_spec(spec())
    ok = [
        decide.ScaleOutcome("L4", "Deployment/l4", 2, previous=0, patched=True),
        decide.ScaleOutcome("A100", "Deployment/a100", 1, previous=1),
    ]
    ready, solved, scaled = decide.plan_conditions(plan, ok, dry_run=False)
    assert (ready.status, ready.reason) == ("True", "Reconciled")
    assert ready.message == "node pools match the plan: L4=2, A100=1"
    assert (solved.status, solved.reason) == ("True", "Optimal")
    assert scaled.status == "True"

    failed = [ok[0], decide.ScaleOutcome("A100", "Deployment/a100", 1, error="not found")]
    ready, _, scaled = decide.plan_conditions(plan, failed, dry_run=False)
    assert (ready.status, ready.reason) == ("False", "ScaleFailed")
    assert scaled.message == "Deployment/a100 (A100): not found"

    ready, _, scaled = decide.plan_conditions(plan, [], dry_run=True)
    assert (ready.status, ready.reason, scaled.status) == ("True", "DryRun", "False")


def test_invalid_and_infeasible_conditions() -> None:
    errors = [api.FieldError("spec.x", "must be 1"), api.FieldError("spec.y", "is required")]
    ready = decide.invalid_conditions(errors)[0]
    assert (ready.status, ready.reason) == ("False", "InvalidSpec")
    assert ready.message == "spec.x: must be 1; spec.y: is required"
    plan = Plan(status="Infeasible", reason="no GPU type can serve input 1-100")
    ready, solved, scaled = decide.infeasible_conditions(plan)
    assert (ready.status, ready.reason) == ("False", "Infeasible")
    assert ready.message == solved.message == "no GPU type can serve input 1-100"
    assert scaled.status == "Unknown"
