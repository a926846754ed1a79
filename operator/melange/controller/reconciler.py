"""The shared reconcile of one allocation, called by the Kopf handlers and by the rate loop.

Validate -> solve (in a worker thread) -> bring every node pool to the plan, patching only those
that differ -> compute the status once -> the Events to post (transitions only). The caller writes
the status and posts the Events: Kopf through its patch, the rate loop through the API.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from melange import api
from melange.api import conditions
from melange.api.conditions import Condition
from melange.controller import decide, metrics
from melange.controller.kube.scale import ScaleError, Scaler
from melange.plan import solver
from melange.signals import distribution as distribution_module

# -- the shared reconcile -------------------------------------------------------------------------


@dataclass(frozen=True)
class EventSpec:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Reconciled:
    """What a reconcile did and what to write: the status fields (None deletes) and the Events."""

    status: dict[str, Any] = field(default_factory=dict)
    events: list[EventSpec] = field(default_factory=list)
    failed: list[decide.ScaleOutcome] = field(default_factory=list)
    solved_rate: float | None = None  # the rate a plan (feasible or not) was solved for


def condition_event(condition: Condition) -> EventSpec:
    kind = "Normal" if condition.status == "True" else "Warning"
    return EventSpec(kind, condition.reason, condition.message[:1024])


def _set_conditions(
    result: Reconciled,
    status: Mapping[str, Any],
    updates: Sequence[Condition],
    generation: int,
    now: datetime,
    dropped: Sequence[str] = (),
) -> None:
    """Set the whole conditions list; an Event when Ready changed status or reason.

    `dropped`: condition types about inputs the spec no longer has (a rate source, a followed
    distribution), removed.
    """
    before = status.get("conditions")
    if dropped:
        before = [
            c for c in before or () if not (isinstance(c, Mapping) and c.get("type") in dropped)
        ]
    result.status["conditions"] = conditions.set_conditions(before, updates, generation, now)
    result.status["observedGeneration"] = generation
    ready = next(c for c in updates if c.type == conditions.READY)
    if conditions.transitioned(before, ready):
        result.events.append(condition_event(ready))


async def _scale(
    scaler: Scaler, namespace: str, spec: api.AllocationSpec, desired: Mapping[str, int]
) -> list[decide.ScaleOutcome]:
    """Bring each node pool to its target; one failing pool does not stop the others."""
    outcomes = []
    for gpu in spec.gpus:
        target = decide.target_name(gpu)
        ref = gpu.scale_target_ref
        assert ref is not None  # checked by decide.operator_errors
        try:
            change = await asyncio.to_thread(
                scaler.ensure_replicas, namespace, ref, gpu.replicas_path, desired[gpu.name]
            )
        except ScaleError as exc:
            outcomes.append(
                decide.ScaleOutcome(gpu.name, target, desired[gpu.name], error=str(exc))
            )
            continue
        outcomes.append(
            decide.ScaleOutcome(
                gpu.name, target, change.current, previous=change.previous, patched=change.patched
            )
        )
    return outcomes


async def reconcile_core(
    *,
    namespace: str,
    name: str,
    raw_spec: Mapping[str, Any],
    status: Mapping[str, Any],
    generation: int,
    trigger: str,
    scaler: Scaler,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    now: datetime,
    rate: float | None = None,
    rate_condition: Condition | None = None,
    distribution: Sequence[Sequence[float]] | None = None,
    distribution_condition: Condition | None = None,
) -> Reconciled:
    """Validate, solve for `rate` (None: spec.workload.totalRate) and `distribution` (None:
    spec.workload.distribution), scale, and say what to write.

    `rate_condition` and `distribution_condition` are the current RateObserved and
    DistributionObserved conditions, written along with the others.
    """
    result = Reconciled()
    try:
        parsed = api.validate_spec(dict(raw_spec))
        missing = decide.operator_errors(parsed)
        if missing:
            raise api.SpecError(missing)
    except api.SpecError as exc:
        logger.warning("Invalid spec, node pools left as they are: %s", exc)
        metrics.record_error(namespace, name, "InvalidSpec")
        updates = decide.invalid_conditions(exc.errors)
        workload = raw_spec.get("workload")
        dropped = [] if "rateSource" in raw_spec else [conditions.RATE_OBSERVED]
        if not (isinstance(workload, Mapping) and "fromPrometheus" in workload):
            dropped.append(conditions.DISTRIBUTION_OBSERVED)
        _set_conditions(result, status, updates, generation, now, dropped)
        return result

    with_rate = parsed.rate_source is not None
    follows = decide.distribution_model(parsed) is not None
    extra = [rate_condition] if with_rate and rate_condition is not None else []
    dropped = [] if with_rate else [conditions.RATE_OBSERVED]
    if not with_rate:
        result.status.update(decide.cleared_rate_status(status))
    if follows and distribution_condition is not None:
        extra.append(distribution_condition)
    if not follows:
        dropped.append(conditions.DISTRIBUTION_OBSERVED)
        result.status.update(distribution_module.cleared_status(status))
    # None also when fitted for other buckets: the next observation fits it again
    fitted = distribution_module.fitting(distribution, parsed.buckets) if follows else None
    if fitted is not None:
        parsed = parsed.model_copy(
            update={"workload": parsed.workload.model_copy(update={"distribution": fitted})}
        )
    plan = await asyncio.to_thread(solver.solve_spec, parsed, rate)
    result.solved_rate = plan.total_rate
    if follows:  # feasible or not, what was solved for; None deletes: the spec's own matrix
        result.status["solvedDistribution"] = fitted
    metrics.record_plan(namespace, name, plan, trigger)
    if not plan.solved:
        logger.warning("No feasible plan, node pools left as they are: %s", plan.reason)
        metrics.record_error(namespace, name, plan.status)
        result.status["planStatus"] = plan.status
        updates = decide.infeasible_conditions(plan)
        _set_conditions(result, status, [*updates, *extra], generation, now, dropped)
        return result

    desired = decide.desired_replicas(parsed, plan)
    outcomes = [] if parsed.dry_run else await _scale(scaler, namespace, parsed, desired)
    for outcome in outcomes:
        if outcome.patched or outcome.error:
            metrics.record_patch(namespace, name, outcome.gpu, ok=not outcome.error)
        if outcome.patched:
            message = f"{outcome.target} ({outcome.gpu}): {outcome.previous} -> {outcome.desired}"
            logger.info("Scaled %s", message)
            result.events.append(EventSpec("Normal", "Scaled", message))
    result.status.update(decide.plan_status(plan, now))
    updates = decide.plan_conditions(plan, outcomes, parsed.dry_run)
    _set_conditions(result, status, [*updates, *extra], generation, now, dropped)
    result.failed = [o for o in outcomes if o.error]
    if result.failed:
        metrics.record_error(namespace, name, "ScaleFailed")
    return result
