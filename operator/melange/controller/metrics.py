"""The operator's own Prometheus metrics: what it decided, how long solving took, what failed.

One dedicated registry (no process/GC collectors mixed in from other libraries, isolated in tests),
`melange_` prefix, base units, bounded labels: namespace, allocation, and gpu where it applies.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

from melange.plan.result import Plan

REGISTRY = CollectorRegistry(auto_describe=True)
ALLOCATION = ("namespace", "allocation")

PLAN_REPLICAS = Gauge(
    "melange_plan_replicas",
    "Instances of a GPU type in the current plan.",
    [*ALLOCATION, "gpu"],
    registry=REGISTRY,
)
PLAN_COST = Gauge(
    "melange_plan_cost_per_hour",
    "Cost of the current plan per hour, in the currency of spec.gpus[].costPerHour.",
    ALLOCATION,
    registry=REGISTRY,
)
PLAN_LOWER_BOUND = Gauge(
    "melange_plan_lower_bound_cost_per_hour",
    "Proven lower bound on the cost per hour: no plan can cost less.",
    ALLOCATION,
    registry=REGISTRY,
)
SOLVED_RATE = Gauge(
    "melange_solved_request_rate",
    "Request rate (requests per second) the current plan was solved for.",
    ALLOCATION,
    registry=REGISTRY,
)
OBSERVED_RATE = Gauge(
    "melange_observed_request_rate",
    "Request rate (requests per second) last read from the rate source.",
    ALLOCATION,
    registry=REGISTRY,
)
RATE_SOURCE_UP = Gauge(
    "melange_rate_source_up",
    "1 when the last query of the rate source gave a usable rate, else 0.",
    ALLOCATION,
    registry=REGISTRY,
)
DISTRIBUTION_DISTANCE = Gauge(
    "melange_distribution_distance",
    "Total variation distance between the request-size distribution last observed and the one "
    "the current plan was solved for (0..1).",
    ALLOCATION,
    registry=REGISTRY,
)
SOLVE_DURATION = Histogram(
    "melange_solve_duration_seconds",
    "Time to solve an allocation's ILP and prove its bound.",
    ALLOCATION,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
SOLVES = Counter(
    "melange_solves",
    "Solves by why they ran (create, update, resume, rate_drift, distribution_drift) and their "
    "result.",
    [*ALLOCATION, "trigger", "result"],
    registry=REGISTRY,
)
SCALE_PATCHES = Counter(
    "melange_scale_patches",
    "Replica-count patches of node pools, by result (patched, failed).",
    [*ALLOCATION, "gpu", "result"],
    registry=REGISTRY,
)
ERRORS = Counter(
    "melange_errors",
    "Reconcile problems by reason (InvalidSpec, Infeasible, ScaleFailed, RateSourceUnavailable...).",
    [*ALLOCATION, "reason"],
    registry=REGISTRY,
)
RATE_QUERIES = Counter(
    "melange_rate_queries",
    "Queries of the rate source, by result (ok, or the failure reason).",
    [*ALLOCATION, "result"],
    registry=REGISTRY,
)
OUTSIDE_CHANGES = Counter(
    "melange_outside_changes",
    "Replica counts of node pools changed by another writer, by what the operator did (reverted, "
    "observed: left as it is under policy Observe).",
    [*ALLOCATION, "gpu", "action"],
    registry=REGISTRY,
)
LEADER = Gauge(
    "melange_leader",
    "1 while this replica holds the leader Lease and may write, else 0.",
    registry=REGISTRY,
)

_PER_ALLOCATION: tuple[Gauge, ...] = (
    PLAN_COST,
    PLAN_LOWER_BOUND,
    SOLVED_RATE,
    OBSERVED_RATE,
    RATE_SOURCE_UP,
    DISTRIBUTION_DISTANCE,
)


def record_plan(namespace: str, allocation: str, plan: Plan, trigger: str) -> None:
    SOLVE_DURATION.labels(namespace, allocation).observe(plan.solve_seconds)
    SOLVES.labels(namespace, allocation, trigger, plan.status.lower()).inc()
    if not plan.solved:
        return
    for gpu in plan.gpus:
        PLAN_REPLICAS.labels(namespace, allocation, gpu.name).set(gpu.replicas)
    PLAN_COST.labels(namespace, allocation).set(plan.cost_per_hour or 0.0)
    PLAN_LOWER_BOUND.labels(namespace, allocation).set(plan.lower_bound or 0.0)
    SOLVED_RATE.labels(namespace, allocation).set(plan.total_rate)


def record_patch(namespace: str, allocation: str, gpu: str, ok: bool) -> None:
    SCALE_PATCHES.labels(namespace, allocation, gpu, "patched" if ok else "failed").inc()


def record_outside_change(namespace: str, allocation: str, gpu: str, reverted: bool) -> None:
    action = "reverted" if reverted else "observed"
    OUTSIDE_CHANGES.labels(namespace, allocation, gpu, action).inc()


def record_leader(leading: bool) -> None:
    LEADER.set(1 if leading else 0)


def record_error(namespace: str, allocation: str, reason: str) -> None:
    ERRORS.labels(namespace, allocation, reason).inc()


def record_rate_query(namespace: str, allocation: str, result: str, rate: float | None) -> None:
    """One query of the rate source: `result` is "ok" (with the rate) or the failure's reason."""
    RATE_QUERIES.labels(namespace, allocation, result).inc()
    RATE_SOURCE_UP.labels(namespace, allocation).set(0 if rate is None else 1)
    if rate is None:
        ERRORS.labels(namespace, allocation, "RateSourceUnavailable").inc()
    else:
        OBSERVED_RATE.labels(namespace, allocation).set(rate)


def record_distribution_distance(namespace: str, allocation: str, distance: float) -> None:
    DISTRIBUTION_DISTANCE.labels(namespace, allocation).set(distance)


def forget_rate_source(namespace: str, allocation: str) -> None:
    """The allocation no longer has a rate source: drop its observation gauges."""
    for gauge in (OBSERVED_RATE, RATE_SOURCE_UP, DISTRIBUTION_DISTANCE):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, allocation)


def forget(namespace: str, allocation: str, gpus: Iterable[str]) -> None:
    """Drop a deleted allocation's gauges, so dashboards do not show a plan that no longer exists."""
    for gauge in _PER_ALLOCATION:
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, allocation)
    for gpu in gpus:
        with contextlib.suppress(KeyError):
            PLAN_REPLICAS.remove(namespace, allocation, gpu)


def serve(port: int, address: str = "0.0.0.0") -> tuple[WSGIServer, threading.Thread]:
    """Expose /metrics on a background thread (the operator's event loop stays free)."""
    return start_http_server(port, addr=address, registry=REGISTRY)


# -- build, conditions, node pools and savings ----------------------------------------------------

# No `_created` series: they double the series of every counter and histogram, and the dashboard and
# the alerts never use them (process-wide in prometheus_client; the operator has no other exporter).
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated

CONDITION_STATUSES = ("True", "False", "Unknown")

BUILD_INFO = Gauge(
    "melange_build_info",
    "Always 1; the operator's version is in the label.",
    ["version"],
    registry=REGISTRY,
)
CONDITION = Gauge(
    "melange_allocation_condition",
    "1 for an allocation condition's current status, 0 for the other statuses (True, False, "
    "Unknown).",
    [*ALLOCATION, "type", "status"],
    registry=REGISTRY,
)
POOL_DESIRED_REPLICAS = Gauge(
    "melange_pool_desired_replicas",
    "Replica count the operator sets a GPU type's node pool to: the plan, within the type's "
    "minReplicas and maxReplicas.",
    [*ALLOCATION, "gpu"],
    registry=REGISTRY,
)
POOL_REPLICAS = Gauge(
    "melange_pool_replicas",
    "Replica count of a GPU type's node pool as the operator last read or set it.",
    [*ALLOCATION, "gpu"],
    registry=REGISTRY,
)
PLAN_SAVING = Gauge(
    "melange_plan_saving_per_hour",
    "Cost per hour of the cheapest single-GPU-type plan minus that of the current plan.",
    ALLOCATION,
    registry=REGISTRY,
)

_condition_types: dict[tuple[str, str], set[str]] = {}
_pool_gpus: dict[tuple[str, str], set[str]] = {}


def record_build_info(version: str) -> None:
    """`melange_build_info{version}` 1 (one series: a previous version's is removed)."""
    BUILD_INFO.clear()
    BUILD_INFO.labels(version).set(1)


def record_conditions(
    namespace: str, allocation: str, conditions: Iterable[Mapping[str, Any]]
) -> None:
    """The allocation's status conditions (`{type, status, ...}` mappings), as kube-state-metrics
    exports them: per type, 1 for the current status and 0 for the other two. The series of a
    type no longer in the list are removed."""
    key = (namespace, allocation)
    current: dict[str, str] = {}
    for condition in conditions:
        kind, status = condition.get("type"), condition.get("status")
        if isinstance(kind, str) and kind:
            current[kind] = status if status in CONDITION_STATUSES else "Unknown"
    for gone in _condition_types.get(key, set()) - set(current):
        CONDITION.remove_by_labels({"namespace": namespace, "allocation": allocation, "type": gone})
    for kind, status in current.items():
        for candidate in CONDITION_STATUSES:
            CONDITION.labels(namespace, allocation, kind, candidate).set(
                1 if candidate == status else 0
            )
    _condition_types[key] = set(current)


def record_pool_replicas(
    namespace: str, allocation: str, desired: Mapping[str, int], observed: Mapping[str, int]
) -> None:
    """Per GPU type, the replica count the operator sets its node pool to and the count it last
    read or set; the series of types not given are removed (a type dropped from the spec)."""
    key = (namespace, allocation)
    gpus = set(desired) | set(observed)
    for gone in _pool_gpus.get(key, set()) - gpus:
        for gauge in (POOL_DESIRED_REPLICAS, POOL_REPLICAS):
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, allocation, gone)
    for gauge, values in ((POOL_DESIRED_REPLICAS, desired), (POOL_REPLICAS, observed)):
        for gpu in gpus:
            if gpu in values:
                gauge.labels(namespace, allocation, gpu).set(values[gpu])
            else:
                with contextlib.suppress(KeyError):
                    gauge.remove(namespace, allocation, gpu)
    _pool_gpus[key] = gpus


def record_saving(namespace: str, allocation: str, plan: Plan) -> None:
    """What the plan saves per hour against the cheapest single-type plan (no series when no
    single type can serve the workload, or the plan is not solved)."""
    best = plan.best_baseline
    if not plan.solved or plan.cost_per_hour is None or best is None:
        with contextlib.suppress(KeyError):
            PLAN_SAVING.remove(namespace, allocation)
        return
    assert best.cost_per_hour is not None  # best_baseline only picks priced baselines
    PLAN_SAVING.labels(namespace, allocation).set(best.cost_per_hour - plan.cost_per_hour)


def forget_state(namespace: str, allocation: str) -> None:
    """Drop a deleted allocation's condition, node-pool and saving series."""
    key = (namespace, allocation)
    labels = {"namespace": namespace, "allocation": allocation}
    for gauge in (CONDITION, POOL_DESIRED_REPLICAS, POOL_REPLICAS, PLAN_SAVING):
        gauge.remove_by_labels(labels)
    _condition_types.pop(key, None)
    _pool_gpus.pop(key, None)
