"""The operator's metric functions, read back from the registry and from its text exposition."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from melange import api
from melange.controller import metrics
from melange.plan import solver
from melange.plan.result import Plan

EXAMPLE = Path(__file__).parents[2] / "examples" / "mixed.yaml"


@pytest.fixture
def allocation() -> tuple[str, str]:
    """A fresh (namespace, allocation): the registry is the process's own, shared by tests."""
    return (f"ns-{uuid.uuid4().hex[:8]}", "chat")


def sample(name: str, **labels: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, labels)


def exposition() -> str:
    return generate_latest(metrics.REGISTRY).decode()


def solved_plan() -> Plan:
    spec = api.validate_resource_spec(yaml.safe_load(EXAMPLE.read_text())["spec"])
    return solver.solve_spec(spec)


def test_build_info_is_one_series_with_the_version() -> None:
    metrics.record_build_info("0.0.9")
    metrics.record_build_info("1.2.3")
    assert sample("melange_build_info", version="1.2.3") == 1
    assert sample("melange_build_info", version="0.0.9") is None


def test_no_created_series_are_exported(allocation: tuple[str, str]) -> None:
    metrics.record_patch(*allocation, "L4", ok=True)
    metrics.record_plan(*allocation, solved_plan(), "create")
    text = exposition()
    assert "melange_scale_patches_total{" in text
    assert "melange_solve_duration_seconds_bucket{" in text
    assert "_created" not in text


def test_conditions_one_for_the_current_status_zero_for_the_others(
    allocation: tuple[str, str],
) -> None:
    ns, name = allocation
    metrics.record_conditions(
        ns,
        name,
        [
            {"type": "Ready", "status": "True", "reason": "Reconciled"},
            {"type": "RateObserved", "status": "False", "reason": "PrometheusUnavailable"},
            {"type": "Scaled", "status": "Sideways"},  # not a status: counted as Unknown
        ],
    )

    def values(kind: str) -> dict[str, float | None]:
        return {
            status: sample(
                "melange_allocation_condition",
                namespace=ns,
                allocation=name,
                type=kind,
                status=status,
            )
            for status in ("True", "False", "Unknown")
        }

    assert values("Ready") == {"True": 1, "False": 0, "Unknown": 0}
    assert values("RateObserved") == {"True": 0, "False": 1, "Unknown": 0}
    assert values("Scaled") == {"True": 0, "False": 0, "Unknown": 1}

    # A transition moves the 1; a condition no longer in the status loses its series.
    metrics.record_conditions(ns, name, [{"type": "Ready", "status": "False"}])
    assert values("Ready") == {"True": 0, "False": 1, "Unknown": 0}
    assert values("RateObserved") == {"True": None, "False": None, "Unknown": None}
    assert values("Scaled") == {"True": None, "False": None, "Unknown": None}


def test_pool_replicas_desired_and_observed_per_gpu(allocation: tuple[str, str]) -> None:
    ns, name = allocation
    metrics.record_pool_replicas(ns, name, {"L4": 2, "A100": 1}, {"L4": 5, "A100": 1})
    labels = {"namespace": ns, "allocation": name}
    assert sample("melange_pool_desired_replicas", **labels, gpu="L4") == 2
    assert sample("melange_pool_replicas", **labels, gpu="L4") == 5
    assert sample("melange_pool_replicas", **labels, gpu="A100") == 1

    # A type dropped from the spec loses its series; one not read yet has only the desired count.
    metrics.record_pool_replicas(ns, name, {"L4": 3, "H100": 1}, {"L4": 3})
    assert sample("melange_pool_desired_replicas", **labels, gpu="A100") is None
    assert sample("melange_pool_replicas", **labels, gpu="A100") is None
    assert sample("melange_pool_replicas", **labels, gpu="L4") == 3
    assert sample("melange_pool_desired_replicas", **labels, gpu="H100") == 1
    assert sample("melange_pool_replicas", **labels, gpu="H100") is None


def test_saving_per_hour_against_the_cheapest_single_type(allocation: tuple[str, str]) -> None:
    ns, name = allocation
    plan = solved_plan()
    best = plan.best_baseline
    assert best is not None
    assert best.cost_per_hour is not None
    assert plan.cost_per_hour is not None
    metrics.record_saving(ns, name, plan)
    saving = sample("melange_plan_saving_per_hour", namespace=ns, allocation=name)
    assert saving == pytest.approx(best.cost_per_hour - plan.cost_per_hour)
    assert saving is not None
    assert saving >= 0  # the mix is never dearer than one type

    metrics.record_saving(ns, name, Plan(status="Infeasible"))
    assert sample("melange_plan_saving_per_hour", namespace=ns, allocation=name) is None


def test_forget_state_drops_every_series_of_the_allocation(allocation: tuple[str, str]) -> None:
    ns, name = allocation
    other = (ns, "other")
    for key in (allocation, other):
        metrics.record_conditions(*key, [{"type": "Ready", "status": "True"}])
        metrics.record_pool_replicas(*key, {"L4": 1}, {"L4": 1})
        metrics.record_saving(*key, solved_plan())
    metrics.forget_state(ns, name)
    text = exposition()
    assert f'allocation="{name}",namespace="{ns}"' not in text
    assert f'allocation="other",namespace="{ns}"' in text
    # Recording again after forgetting starts from scratch.
    metrics.record_conditions(ns, name, [{"type": "Solved", "status": "True"}])
    assert (
        sample(
            "melange_allocation_condition",
            namespace=ns,
            allocation=name,
            type="Solved",
            status="True",
        )
        == 1
    )
