"""What a reconcile decides, without doing it: target replicas, the status, the conditions.

The handlers do the I/O (solve off the event loop, read and patch node pools, write status, post
Events) and call these pure functions in between, so every decision is unit-tested on its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from melange.api import AllocationSpec, FieldError, GpuType, RateSource
from melange.api.conditions import (
    DISTRIBUTION_OBSERVED,
    RATE_OBSERVED,
    READY,
    SCALED,
    SOLVED,
    Condition,
    timestamp,
)
from melange.plan import report
from melange.plan.result import Plan
from melange.signals import rates
from melange.signals.rates import RateError

MAX_QUERY_SECONDS = 10
RATE_STATUS_FIELDS = ("observedRate", "lastObservationTime", "rateHistory")


@dataclass(frozen=True)
class ScaleOutcome:
    """What happened to one GPU type's node pool."""

    gpu: str
    target: str  # "MachineDeployment/gpu-a10g", as people name objects
    desired: int
    previous: int | None = None  # None when it could not be read
    patched: bool = False
    error: str | None = None


def target_name(gpu: GpuType) -> str:
    ref = gpu.scale_target_ref
    return f"{ref.kind}/{ref.name}" if ref else f"(no scaleTargetRef for {gpu.name})"


def operator_errors(spec: AllocationSpec) -> list[FieldError]:
    """Rules the operator adds to the spec's own: every GPU type needs a node pool to scale, and a
    rate source needs a query (its own, or the default one for a model)."""
    errors = [
        FieldError(f"spec.gpus[{k}].scaleTargetRef", "is required")
        for k, gpu in enumerate(spec.gpus)
        if gpu.scale_target_ref is None
    ]
    return errors + rate_source_errors(spec)


def rate_source_errors(spec: AllocationSpec) -> list[FieldError]:
    source = spec.rate_source
    follow = spec.workload.from_prometheus
    if source is None:
        if follow is None:
            return []
        return [
            FieldError(
                "spec.workload.fromPrometheus",
                "needs spec.rateSource (its Prometheus, credentials and interval are used)",
            )
        ]
    prometheus, path = source.prometheus, "spec.rateSource.prometheus"
    errors = []
    if follow is not None and follow.model_name is None and prometheus.model_name is None:
        errors.append(
            FieldError(
                "spec.workload.fromPrometheus.modelName",
                "is required when spec.rateSource.prometheus has no modelName (the token "
                "histograms are selected by vLLM's model_name label)",
            )
        )
    if (prometheus.query is None) == (prometheus.model_name is None):
        errors.append(FieldError(path, "set exactly one of query and modelName"))
    if prometheus.range_seconds is not None and prometheus.model_name is None:
        errors.append(
            FieldError(
                f"{path}.rangeSeconds", "applies to the default query, which needs modelName"
            )
        )
    return errors


def rate_query(source: RateSource) -> str:
    """The PromQL the operator runs: the spec's own, or vLLM's request rate for `modelName`."""
    prometheus = source.prometheus
    if prometheus.query is not None:
        return prometheus.query
    assert prometheus.model_name is not None  # checked by rate_source_errors
    return rates.default_query(
        prometheus.model_name, prometheus.range_seconds or rates.DEFAULT_RANGE_SECONDS
    )


def distribution_model(spec: AllocationSpec) -> str | None:
    """The model whose token histograms to follow, or None when the spec does not follow them."""
    follow, source = spec.workload.from_prometheus, spec.rate_source
    if follow is None or source is None:
        return None
    return follow.model_name or source.prometheus.model_name


def query_timeout(source: RateSource) -> float:
    """A query may take at most one interval, and never more than 10 s."""
    return float(min(source.interval_seconds, MAX_QUERY_SECONDS))


def rate_observed(observed: float, url: str) -> Condition:
    return Condition(RATE_OBSERVED, "True", "Observed", f"{observed:.4g} req/s from {url}")


def rate_failed(error: RateError) -> Condition:
    return Condition(
        RATE_OBSERVED,
        "False",
        error.reason,
        f"{error.message}; the current plan and node pools are kept",
    )


def distribution_observed(summary: str, moved: float) -> Condition:
    return Condition(
        DISTRIBUTION_OBSERVED,
        "True",
        "Observed",
        f"{summary}; {moved:.1%} from the distribution the plan was solved for",
    )


def distribution_failed(error: RateError) -> Condition:
    return Condition(
        DISTRIBUTION_OBSERVED,
        "False",
        error.reason,
        f"{error.message}; the plan keeps the distribution it was solved for",
    )


def observation_status(
    observed: float, now: datetime, history: Sequence[rates.RateSample]
) -> dict[str, Any]:
    return {
        "observedRate": round(observed, 6),
        "lastObservationTime": timestamp(now),
        "rateHistory": rates.history_to_status(history),
    }


def cleared_rate_status(status: Mapping[str, Any]) -> dict[str, Any]:
    """The observation fields to delete (merge-patch nulls) once the spec has no rate source."""
    return {key: None for key in RATE_STATUS_FIELDS if status.get(key) is not None}


def desired_replicas(spec: AllocationSpec, plan: Plan) -> dict[str, int]:
    """The plan's replicas, never below `minReplicas` nor above `maxReplicas`."""
    planned = plan.replicas()
    result = {}
    for gpu in spec.gpus:
        replicas = max(planned.get(gpu.name, 0), gpu.min_replicas)
        if gpu.max_replicas is not None:
            replicas = min(replicas, gpu.max_replicas)
        result[gpu.name] = replicas
    return result


def plan_status(plan: Plan, now: datetime) -> dict[str, Any]:
    """The plan as `status` fields (lists keyed by name, numbers rounded for stable output)."""
    data = report.plan_to_dict(plan)
    return {
        "planStatus": plan.status,
        "costPerHour": data["costPerHour"],
        "lowerBound": data["lowerBound"],
        "totalReplicas": sum(g.replicas for g in plan.gpus),
        "solvedRate": data["totalRate"],
        "gpus": data["gpus"],
        "assignment": data["assignment"],
        "lastSolveTime": timestamp(now),
        "solveSeconds": data["solveSeconds"],
    }


def invalid_conditions(errors: Sequence[FieldError]) -> list[Condition]:
    message = "; ".join(str(e) for e in errors)
    return [
        Condition(READY, "False", "InvalidSpec", message),
        Condition(SOLVED, "False", "InvalidSpec", "the spec is invalid; nothing was solved"),
        Condition(SCALED, "Unknown", "InvalidSpec", "node pools were left as they are"),
    ]


def infeasible_conditions(plan: Plan) -> list[Condition]:
    """No plan to act on: proven `Infeasible`, or `Unsolved` (time ran out with neither a plan nor a
    proof); the reason says which, and the pools stay as they are."""
    message = plan.reason or "no plan serves the workload"
    return [
        Condition(READY, "False", plan.status, message),
        Condition(SOLVED, "False", plan.status, message),
        Condition(SCALED, "Unknown", plan.status, "node pools were left as they are"),
    ]


def _solved_condition(plan: Plan) -> Condition:
    gap = plan.gap or 0.0
    cost = plan.cost_per_hour or 0.0
    verdict = "optimal" if plan.status == "Optimal" else "best found within the time limit"
    return Condition(
        SOLVED,
        "True",
        plan.status,
        f"{verdict}: {cost:.2f}/h for {plan.total_rate:.4g} req/s "
        f"(lower bound {plan.lower_bound or 0:.2f}/h, gap {gap:.1%})",
    )


def plan_conditions(plan: Plan, outcomes: Sequence[ScaleOutcome], dry_run: bool) -> list[Condition]:
    """Conditions after a successful solve: Solved, then Scaled from the per-pool outcomes."""
    solved = _solved_condition(plan)
    if dry_run:
        return [
            Condition(
                READY, "True", "DryRun", "planned; dryRun is set, so no node pool is patched"
            ),
            solved,
            Condition(SCALED, "False", "DryRun", "dryRun is set: no node pool was patched"),
        ]
    failed = [o for o in outcomes if o.error]
    if failed:
        message = "; ".join(f"{o.target} ({o.gpu}): {o.error}" for o in failed)
        return [
            Condition(READY, "False", "ScaleFailed", message),
            solved,
            Condition(SCALED, "False", "ScaleFailed", message),
        ]
    summary = ", ".join(f"{o.gpu}={o.desired}" for o in outcomes)
    return [
        Condition(READY, "True", "Reconciled", f"node pools match the plan: {summary}"),
        solved,
        Condition(SCALED, "True", "Scaled", f"node pools match the plan: {summary}"),
    ]
