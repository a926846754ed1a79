"""Kopf handlers: thin glue between the cluster and the pure modules.

One idempotent, level-based reconcile runs when an allocation is created, when its spec changes and
when the operator (re)starts: validate -> solve (in a worker thread) -> bring every node pool to the
plan, patching only those that differ -> write status once -> post Events on transitions only.
There are no delete handlers, so Kopf puts no finalizer on allocations: deleting one never waits
for the operator, and leaves the node pools as they are.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import kopf

from melange import api, conditions, metrics, reconcile, solver
from melange.scaling import ScaleError, Scaler, new_api_client

GROUP, VERSION, PLURAL = api.API_GROUP, api.API_VERSION, "melangeallocations"
SCALE_RETRY_SECONDS = 15.0


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Names fixed on day one: changing storage later would make every object look unhandled."""
    settings.persistence.progress_storage = kopf.SmartProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.reporting_component = "melange-operator"
    settings.posting.reporting_instance = os.environ.get("HOSTNAME", "melange-operator")
    settings.posting.event_name_prefix = "melange-"
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.watching.connect_timeout = 5
    settings.networking.request_timeout = 30
    # The CRD is installed before the operator (the chart's crds/), and namespaces are named, not
    # patterns: no run-time watching of CRDs and namespaces, so no cluster-wide RBAC for them.
    settings.scanning.disabled = True
    if "scaler" not in memo:
        memo["scaler"] = Scaler(new_api_client(os.environ.get("KUBECONFIG")))


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster service account first, else the kubeconfig; Kopf's own readers, no client library."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def _event(body: kopf.Body, condition: conditions.Condition) -> None:
    kind = "Normal" if condition.status == "True" else "Warning"
    kopf.event(body, type=kind, reason=condition.reason, message=condition.message[:1024])


def _write_conditions(
    patch: kopf.Patch,
    body: kopf.Body,
    status: Mapping[str, Any],
    updates: Sequence[conditions.Condition],
    generation: int,
    now: datetime,
) -> None:
    """Set the whole conditions list, and post an Event when Ready changed status or reason."""
    before = status.get("conditions")
    patch.status["conditions"] = conditions.set_conditions(before, updates, generation, now)
    patch.status["observedGeneration"] = generation
    ready = next(c for c in updates if c.type == conditions.READY)
    if conditions.transitioned(before, ready):
        _event(body, ready)


async def _scale(
    scaler: Scaler, namespace: str, spec: api.AllocationSpec, desired: Mapping[str, int]
) -> list[reconcile.ScaleOutcome]:
    """Bring each node pool to its target; one failing pool does not stop the others."""
    outcomes = []
    for gpu in spec.gpus:
        target = reconcile.target_name(gpu)
        ref = gpu.scale_target_ref
        assert ref is not None  # checked by reconcile.operator_errors
        try:
            change = await asyncio.to_thread(
                scaler.ensure_replicas, namespace, ref, gpu.replicas_path, desired[gpu.name]
            )
        except ScaleError as exc:
            outcomes.append(
                reconcile.ScaleOutcome(gpu.name, target, desired[gpu.name], error=str(exc))
            )
            continue
        outcomes.append(
            reconcile.ScaleOutcome(
                gpu.name, target, change.current, previous=change.previous, patched=change.patched
            )
        )
    return outcomes


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def reconcile_allocation(
    body: kopf.Body,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    namespace: str | None,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: kopf.Logger,
    name: str | None,
    reason: Any,
    **_: Any,
) -> None:
    now = datetime.now(UTC)
    allocation = str(name)
    trigger = str(getattr(reason, "value", reason))
    generation = int(meta.get("generation") or 0)
    assert namespace is not None  # the CRD is namespaced
    try:
        parsed = api.validate_spec(dict(spec))
        missing = reconcile.operator_errors(parsed)
        if missing:
            raise api.SpecError(missing)
    except api.SpecError as exc:
        logger.warning("Invalid spec, node pools left as they are: %s", exc)
        metrics.record_error(namespace, allocation, "InvalidSpec")
        updates = reconcile.invalid_conditions(exc.errors)
        _write_conditions(patch, body, status, updates, generation, now)
        return

    plan = await asyncio.to_thread(solver.solve_spec, parsed)
    metrics.record_plan(namespace, allocation, plan, trigger)
    if not plan.solved:
        logger.warning("No feasible plan, node pools left as they are: %s", plan.reason)
        metrics.record_error(namespace, allocation, "Infeasible")
        patch.status["planStatus"] = plan.status
        updates = reconcile.infeasible_conditions(plan)
        _write_conditions(patch, body, status, updates, generation, now)
        return

    desired = reconcile.desired_replicas(parsed, plan)
    outcomes = [] if parsed.dry_run else await _scale(memo["scaler"], namespace, parsed, desired)
    for outcome in outcomes:
        if outcome.patched or outcome.error:
            metrics.record_patch(namespace, allocation, outcome.gpu, ok=not outcome.error)
        if outcome.patched:
            message = f"{outcome.target} ({outcome.gpu}): {outcome.previous} -> {outcome.desired}"
            logger.info("Scaled %s", message)
            kopf.event(body, type="Normal", reason="Scaled", message=message)
    for key, value in reconcile.plan_status(plan, now).items():
        patch.status[key] = value
    updates = reconcile.plan_conditions(plan, outcomes, parsed.dry_run)
    _write_conditions(patch, body, status, updates, generation, now)
    failed = [o for o in outcomes if o.error]
    if failed:
        metrics.record_error(namespace, allocation, "ScaleFailed")
        raise kopf.TemporaryError(
            "; ".join(f"{o.target}: {o.error}" for o in failed), delay=SCALE_RETRY_SECONDS
        )


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def forget_allocation(spec: kopf.Spec, namespace: str | None, name: str | None, **_: Any) -> None:
    """Optional: no finalizer. If the operator misses the deletion, only stale gauges remain."""
    gpus = [g.get("name", "") for g in spec.get("gpus") or [] if isinstance(g, Mapping)]
    metrics.forget(str(namespace), str(name), gpus)
