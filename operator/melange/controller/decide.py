"""What a reconcile decides, without doing it: target replicas, the status, the conditions.

The handlers do the I/O (solve off the event loop, read and patch node pools, write status, post
Events) and call these pure functions in between, so every decision is unit-tested on its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from melange.api import AllocationSpec, FieldError, GpuType, RateSource
from melange.api.conditions import (
    BUDGET_LIMITED,
    CAPACITY_LIMITED,
    DISTRIBUTION_OBSERVED,
    PRICES_OBSERVED,
    RATE_OBSERVED,
    READY,
    SCALED,
    SOLVED,
    TRANSITIONING,
    Condition,
    timestamp,
)
from melange.controller.transition import Cap, PoolReading, Step
from melange.plan import report
from melange.plan.result import Plan
from melange.signals import coverage, rates
from melange.signals.prices import PriceDecision
from melange.signals.rates import RateError

MAX_QUERY_SECONDS = 10
# The per-bucket routing table is kept in the status up to this size of JSON. The largest spec the
# CRD admits (32 x 32 buckets, 16 types, every number at full precision) makes a table of about
# 150 KB; one whose buckets are each split between many types could pass the API server's limit on
# a whole object (about 1.5 MiB, with the spec and kubectl's copy of it), so it is left out instead.
MAX_ROUTING_BYTES = 256 * 1024
RATE_STATUS_FIELDS = ("observedRate", "lastObservationTime", "observedSince", "rateHistory")


@dataclass(frozen=True)
class ScaleOutcome:
    """What happened to one GPU type's node pool."""

    gpu: str
    target: str  # "MachineDeployment/gpu-a10g", as people name objects
    desired: int
    previous: int | None = None  # None when it could not be read
    patched: bool = False
    error: str | None = None
    kept: int | None = None  # left at this count after an outside change (policy Observe)


def target_name(gpu: GpuType) -> str:
    ref = gpu.scale_target_ref
    return f"{ref.kind}/{ref.name}" if ref else f"(no scaleTargetRef for {gpu.name})"


def rate_query(source: RateSource) -> str:
    """The PromQL the operator runs: the spec's own, or vLLM's request rate for `modelName`."""
    prometheus = source.prometheus
    if prometheus.query is not None:
        return prometheus.query
    assert prometheus.model_name is not None  # checked by the spec's own rules
    return rates.default_query(
        prometheus.model_name, prometheus.range_seconds or rates.DEFAULT_RANGE_SECONDS
    )


def rate_samples(source: RateSource) -> tuple[str, int] | None:
    """The raw samples behind the default query and its range, to check the range is covered.

    None for the spec's own query: the operator cannot know which series and range it reads.
    """
    prometheus = source.prometheus
    if prometheus.query is not None:
        return None
    assert prometheus.model_name is not None  # checked by the spec's own rules
    range_seconds = prometheus.range_seconds or rates.DEFAULT_RANGE_SECONDS
    return coverage.samples_query(prometheus.model_name, range_seconds), range_seconds


def consecutive(previous: datetime | None, now: datetime, source: RateSource) -> bool:
    """Whether an observation follows the previous one without a gap (a missed poll or more)."""
    if previous is None:
        return False
    allowed = 2 * source.interval_seconds + MAX_QUERY_SECONDS
    return (now - previous).total_seconds() <= allowed


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
    observed: float, now: datetime, since: datetime, history: Sequence[rates.RateSample]
) -> dict[str, Any]:
    return {
        "observedRate": round(observed, 6),
        "lastObservationTime": timestamp(now),
        "observedSince": timestamp(since),
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
    routing: list[dict[str, Any]] | None = data["assignment"]
    omitted = None
    size = len(json.dumps(routing, separators=(",", ":")))
    if size > MAX_ROUTING_BYTES:
        omitted = (
            f"the routing table of {len(data['assignment'])} buckets is {size} bytes of JSON, more "
            f"than the {MAX_ROUTING_BYTES} the status keeps; `melange solve -o yaml` prints it "
            "(as `assignment`)"
        )
        routing = None  # a merge patch deletes the stale table
    return {
        "planStatus": plan.status,
        "costPerHour": data["costPerHour"],
        "lowerBound": data["lowerBound"],
        **saving_status(plan),
        "totalReplicas": sum(g.replicas for g in plan.gpus),
        "gpuTypes": sum(1 for g in plan.gpus if g.replicas > 0),
        "solvedRate": data["totalRate"],
        "gpus": data["gpus"],
        # not "assignment" (the CLI's name): `kubectl describe` prints fields in alphabetical
        # order, and this long per-bucket list would come before the conditions
        "routing": routing,
        "routingOmitted": omitted,
        "lastSolveTime": timestamp(now),
        "solveSeconds": data["solveSeconds"],
    }


def saving_status(plan: Plan) -> dict[str, Any]:
    """What the mix saves per hour against the cheapest single-type plan (None: no such plan)."""
    best = plan.best_baseline
    if best is None or best.cost_per_hour is None or plan.cost_per_hour is None:
        return {"savingPerHour": None, "singleTypeBaseline": None}
    return {
        "savingPerHour": round(best.cost_per_hour - plan.cost_per_hour, 6),
        "singleTypeBaseline": {
            "name": best.gpu,
            "replicas": best.replicas,
            "costPerHour": round(best.cost_per_hour, 6),
        },
    }


def invalid_conditions(errors: Sequence[FieldError]) -> list[Condition]:
    message = "; ".join(str(e) for e in errors)
    return with_ready(
        [
            Condition(SOLVED, "False", "InvalidSpec", message),
            Condition(SCALED, "Unknown", "InvalidSpec", "node pools were left as they are"),
        ]
    )


def infeasible_conditions(plan: Plan) -> list[Condition]:
    """No plan to act on: proven `Infeasible`, or `Unsolved` (time ran out with neither a plan nor a
    proof); the reason says which, and the pools stay as they are."""
    message = plan.reason or "no plan serves the workload"
    return with_ready(
        [
            Condition(SOLVED, "False", plan.status, message),
            Condition(SCALED, "Unknown", plan.status, "node pools were left as they are"),
        ]
    )


def solved_condition(plan: Plan, note: str | None = None) -> Condition:
    gap = plan.gap or 0.0
    cost = plan.cost_per_hour or 0.0
    if plan.status == "Optimal":
        verdict = "optimal"
    else:
        verdict = "feasible" if note else "best found within the time limit"
    return Condition(
        SOLVED,
        "True",
        plan.status,
        f"{verdict}: {cost:.2f}/h for {plan.total_rate:.4g} req/s "
        f"(lower bound {plan.lower_bound or 0:.2f}/h, gap {gap:.1%})"
        + (f"; {note}" if note else ""),
    )


def activation_note(value: float | None, rate: float, note: str | None) -> str:
    woken = (
        f"requests wait (the activation query reads {value or 0:g}) and the observed rate plans "
        f"no replica: planned for workload.totalRate, {rate:g} req/s"
    )
    return f"{woken}; {note}" if note else woken


def status_entries(status: Mapping[str, Any], field: str) -> list[Mapping[str, Any]]:
    """The entries of a list in the status that are objects (none when it is absent or is not a
    list): a status is read as the API server stored it, whatever wrote it."""
    value = status.get(field)
    return (
        [entry for entry in value if isinstance(entry, Mapping)] if isinstance(value, list) else []
    )


def planned_counts(status: Mapping[str, Any]) -> dict[str, int] | None:
    """The counts of the plan in force (status.gpus), or None before the first plan."""
    entries = status_entries(status, "gpus")
    if not entries:
        return None
    counts = {}
    for entry in entries:
        if isinstance(entry.get("name"), str):
            replicas = entry.get("replicas")
            counts[entry["name"]] = replicas if isinstance(replicas, int) else 0
    return counts


def plan_conditions(plan: Plan, outcomes: Sequence[ScaleOutcome], dry_run: bool) -> list[Condition]:
    """Conditions after a successful solve: Solved, then Scaled from the per-pool outcomes."""
    return with_ready([solved_condition(plan), scaled_condition(outcomes, dry_run)])


def scaled_condition(outcomes: Sequence[ScaleOutcome], dry_run: bool) -> Condition:
    if dry_run:
        return Condition(SCALED, "False", "DryRun", "dryRun is set: no node pool was patched")
    failed = [o for o in outcomes if o.error]
    if failed:
        message = "; ".join(f"{o.target} ({o.gpu}): {o.error}" for o in failed)
        return Condition(SCALED, "False", "ScaleFailed", message)
    kept = [o for o in outcomes if o.kept is not None]
    if kept:
        message = "; ".join(
            f"{o.target} ({o.gpu}) is at {o.kept}, the plan says {o.desired} (policy Observe)"
            for o in kept
        )
        return Condition(SCALED, "False", "OutsideChange", message)
    summary = ", ".join(f"{o.gpu}={o.desired}" for o in outcomes)
    return Condition(SCALED, "True", "Scaled", f"node pools match the plan: {summary}")


# -- ownership of node pools ----------------------------------------------------------------------

TargetKey = tuple[str, str, str, str]  # (namespace, or "" when cluster-scoped; group; kind; name)
AllocationKey = tuple[str, str]  # (namespace, name)
RECENT_PATCHES = 10


@dataclass(frozen=True)
class Claim:
    """One allocation's claim on its targets; the earliest created (then by name) owns a target."""

    allocation: AllocationKey
    created: str  # metadata.creationTimestamp, RFC 3339 (sorts as time)
    targets: tuple[TargetKey, ...]


Rank = tuple[str, AllocationKey]  # (created, allocation): the earlier ranks first


@dataclass(frozen=True)
class ClaimIndex:
    """Per target, its earliest claim. Built once from every allocation's claim, it answers each
    allocation's ownership check in the time of its own targets, not of every allocation's."""

    earliest: Mapping[TargetKey, Rank]

    @classmethod
    def of(cls, claims: Iterable[Claim]) -> ClaimIndex:
        earliest: dict[TargetKey, Rank] = {}
        for claim in claims:
            here = (claim.created, claim.allocation)
            for target in claim.targets:
                if target not in earliest or here < earliest[target]:
                    earliest[target] = here
        return cls(earliest)

    def conflicts(self, mine: Claim) -> list[tuple[TargetKey, AllocationKey]]:
        """The targets of `mine` that an earlier allocation already claims, with that allocation.

        The order is by creation, so the verdict is the same on every replica and after
        restarts, and the allocation that came first keeps its pools. (An index that holds
        `mine` itself is fine: no rank is earlier than itself.)
        """
        rank = (mine.created, mine.allocation)
        return [
            (target, self.earliest[target][1])
            for target in dict.fromkeys(mine.targets)
            if target in self.earliest and self.earliest[target] < rank
        ]


def describe_target(target: TargetKey) -> str:
    namespace, _, kind, name = target
    return f"{kind}/{name}" + (f" in namespace {namespace}" if namespace else " (cluster-scoped)")


def conflict_condition(conflicts: Sequence[tuple[TargetKey, AllocationKey]]) -> Condition:
    message = "; ".join(
        f"{describe_target(target)} belongs to MelangeAllocation {owner[0]}/{owner[1]}"
        for target, owner in conflicts
    )
    return Condition(SCALED, "False", "TargetConflict", f"{message}; nothing was patched")


def not_allowed_condition(messages: Sequence[str]) -> Condition:
    text = "; ".join(messages)
    return Condition(SCALED, "False", "TargetNotAllowed", f"{text}; nothing was patched")


@dataclass(frozen=True)
class PoolRecord:
    """What the operator last knew of a pool: the target, the count it wanted and the count seen.

    With make-before-break also the plan's count (which `desired` reaches step by step), the ready
    count, since when fewer were ready than asked for, and when the pool was last patched.
    """

    target: str
    desired: int
    observed: int
    planned: int | None = None
    ready: int | None = None
    short_since: datetime | None = None
    last_scale: datetime | None = None


@dataclass(frozen=True)
class PoolAction:
    patch: bool
    outside: bool  # the pool moved since the operator last saw or set it
    reason: str  # why it is patched (or, with `outside` and no patch, why it is left)


def pool_action(
    current: int, desired: int, record: PoolRecord | None, policy: str, target: str, trigger: str
) -> PoolAction:
    """Patch, leave, or only report one pool.

    An outside change is a count different from the one the operator last saw or set on this same
    target. `Enforce` sets it back to the plan; `Observe` leaves it, and patches only when the plan
    asks for a count it has not asked for before.
    """
    same = record is not None and record.target == target
    outside = same and record is not None and current != record.observed
    if current == desired:
        return PoolAction(False, False, "")
    if policy == "Observe" and same and record is not None and record.desired == desired:
        return PoolAction(False, outside, "OutsideChange")
    return PoolAction(True, outside, "OutsideChange" if outside else trigger)


def pool_records(status: Mapping[str, Any]) -> dict[str, PoolRecord]:
    """The records persisted in `status.targets`, by GPU name (malformed entries are ignored)."""
    records = {}
    for entry in status_entries(status, "targets"):
        name, target = entry.get("name"), entry.get("target")
        desired, observed = entry.get("desiredReplicas"), entry.get("observedReplicas")
        if (
            isinstance(name, str)
            and isinstance(target, str)
            and isinstance(desired, int)
            and isinstance(observed, int)
        ):
            planned, ready = entry.get("plannedReplicas"), entry.get("readyReplicas")
            records[name] = PoolRecord(
                target,
                desired,
                observed,
                planned=planned if isinstance(planned, int) else None,
                ready=ready if isinstance(ready, int) else None,
                short_since=rates.parse_time(entry.get("shortSince")),
                last_scale=rates.parse_time(entry.get("lastScaleTime")),
            )
    return records


def targets_status(records: Mapping[str, PoolRecord], policies: Mapping[str, str]) -> list[Any]:
    entries = []
    for gpu, record in records.items():
        entry: dict[str, Any] = {
            "name": gpu,
            "target": record.target,
            "policy": policies.get(gpu, "Enforce"),
            "desiredReplicas": record.desired,
            "observedReplicas": record.observed,
        }
        optional = {
            "plannedReplicas": record.planned,
            "readyReplicas": record.ready,
            "shortSince": timestamp(record.short_since) if record.short_since else None,
            "lastScaleTime": timestamp(record.last_scale) if record.last_scale else None,
        }
        entry.update({k: v for k, v in optional.items() if v is not None})
        entries.append(entry)
    return entries


def recent_patches(
    before: Any, patched: Sequence[ScaleOutcome], reasons: Mapping[str, str], now: datetime
) -> list[dict[str, Any]]:
    """The last few patches, newest first, each with its reason: `kubectl describe` says why."""
    entries = [
        {
            "time": timestamp(now),
            "name": o.gpu,
            "target": o.target,
            "from": o.previous,
            "to": o.desired,
            "reason": reasons.get(o.gpu, "Plan"),
        }
        for o in patched
        if o.patched
    ]
    kept = [dict(e) for e in before if isinstance(e, Mapping)] if isinstance(before, list) else []
    return (entries + kept)[:RECENT_PATCHES]


def outside_change_message(
    outcome: ScaleOutcome, observed: int, record: PoolRecord, kept: bool
) -> str:
    what = f"{outcome.target} ({outcome.gpu}) was changed from {record.observed} to {observed} by another writer"
    if kept:
        return f"{what}; policy Observe: left at {observed} (the plan says {outcome.desired})"
    return f"{what}; set back to {outcome.desired}"


def with_ready(updates: Sequence[Condition]) -> list[Condition]:
    """Ready derived from the others: True only when the plan is solved and the pools match it."""
    by_type = {c.type: c for c in updates}
    solved, scaled = by_type.get(SOLVED), by_type.get(SCALED)
    if scaled is not None and scaled.reason == "DryRun" and solved is not None:
        ready = Condition(
            READY, "True", "DryRun", "planned; dryRun is set, so no node pool is patched"
        )
    else:
        failing = next((c for c in (solved, scaled) if c is not None and c.status != "True"), None)
        if failing is not None:
            ready = Condition(READY, "False", failing.reason, failing.message)
        else:
            assert scaled is not None
            ready = Condition(READY, "True", "Reconciled", scaled.message)
    return [ready, *(c for c in updates if c.type != READY)]


# -- transitions and capacity caps ----------------------------------------------------------------


def pool_summary(
    planned: Mapping[str, int], targets: Mapping[str, int], pools: Mapping[str, PoolReading]
) -> str:
    """Per type: the plan's count, the count asked for now and the ready count."""
    parts = []
    for name, plan in planned.items():
        pool = pools.get(name)
        ready = "?" if pool is None or pool.ready is None else str(pool.ready)
        parts.append(f"{name}: plan {plan}, asked {targets.get(name, plan)}, ready {ready}")
    return "; ".join(parts)


def transition_condition(
    step: Step, planned: Mapping[str, int], pools: Mapping[str, PoolReading], timeout: int
) -> Condition:
    summary = pool_summary(planned, step.targets, pools)
    if not step.in_progress:
        return Condition(TRANSITIONING, "False", "AtPlan", f"every pool is at the plan: {summary}")
    why = []
    if step.waiting:
        why.append(f"waiting for {', '.join(step.waiting)} to be ready")
    if step.held:
        why.append(f"scale-down of {', '.join(step.held)} held until then (at most {timeout} s)")
    if step.timed_out:
        why.append(
            f"the scale-downs went ahead without them: they were not ready within {timeout} s "
            "(transition.readyTimeoutSeconds)"
        )
    if step.pending:
        why.append(f"no more asked of {', '.join(step.pending)} while its scale-up is in flight")
    if step.limited:
        why.append(f"{', '.join(step.limited)} moving by its step limit")
    reason = "WaitingForReady" if step.waiting or step.pending else "StepLimited"
    return Condition(TRANSITIONING, "True", reason, f"{'; '.join(why)}. {summary}")


def transition_scaled(
    step: Step, planned: Mapping[str, int], pools: Mapping[str, PoolReading]
) -> Condition:
    summary = pool_summary(planned, step.targets, pools)
    return Condition(SCALED, "False", "Transitioning", f"on the way to the plan: {summary}")


def capacity_condition(caps: Mapping[str, Cap]) -> Condition:
    if not caps:
        return Condition(CAPACITY_LIMITED, "False", "NotLimited", "every GPU type gets its count")
    message = "; ".join(
        f"{name} is capped at {cap.replicas} (the ready count: it stayed short of what it was "
        f"asked for; no quota or no capacity in its zone?) until {timestamp(cap.retry)}"
        for name, cap in caps.items()
    )
    return Condition(
        CAPACITY_LIMITED, "True", "CapacityShort", f"{message}; the plan is solved within the cap"
    )


def caps_status(caps: Mapping[str, Cap]) -> list[dict[str, Any]] | None:
    if not caps:
        return None
    return [
        {
            "name": name,
            "replicas": cap.replicas,
            "since": timestamp(cap.since),
            "retryTime": timestamp(cap.retry),
        }
        for name, cap in caps.items()
    ]


def caps_from_status(status: Mapping[str, Any]) -> dict[str, Cap]:
    caps = {}
    for entry in status_entries(status, "gpuCaps"):
        name, replicas = entry.get("name"), entry.get("replicas")
        since, retry = (
            rates.parse_time(entry.get("since")),
            rates.parse_time(entry.get("retryTime")),
        )
        if isinstance(name, str) and isinstance(replicas, int) and retry is not None:
            caps[name] = Cap(replicas, since or retry, retry)
    return caps


def capped_spec(spec: AllocationSpec, caps: Mapping[str, Cap]) -> AllocationSpec:
    """The spec with each capped type's maxReplicas lowered to its cap (never below minReplicas)."""
    if not caps:
        return spec
    gpus = []
    for gpu in spec.gpus:
        cap = caps.get(gpu.name)
        if cap is None:
            gpus.append(gpu)
            continue
        limit = max(cap.replicas, gpu.min_replicas)
        if gpu.max_replicas is not None:
            limit = min(limit, gpu.max_replicas)
        gpus.append(gpu.model_copy(update={"max_replicas": limit}))
    return spec.model_copy(update={"gpus": gpus})


# -- prices ---------------------------------------------------------------------------------------


def prices_condition(decision: PriceDecision, read: Mapping[str, float | RateError]) -> Condition:
    if decision.failed:
        first = decision.failed[0][1]
        message = "; ".join(error.message for _, error in decision.failed)
        return Condition(
            PRICES_OBSERVED,
            "False",
            first.reason,
            f"{message}; the plan keeps the prices it was solved with",
        )
    shown = ", ".join(f"{name} {value:g}/h" for name, value in read.items())
    return Condition(PRICES_OBSERVED, "True", "Observed", f"prices read: {shown}")


# -- shared budgets -------------------------------------------------------------------------------


def budgeted_spec(spec: AllocationSpec, budgets: Mapping[str, int]) -> AllocationSpec:
    """The spec with each budgeted type's maxReplicas (and minReplicas) at most what is left."""
    gpus = []
    for gpu in spec.gpus:
        left = budgets.get(gpu.name)
        if left is None:
            gpus.append(gpu)
            continue
        high = left if gpu.max_replicas is None else min(gpu.max_replicas, left)
        gpus.append(
            gpu.model_copy(
                update={"max_replicas": high, "min_replicas": min(gpu.min_replicas, high)}
            )
        )
    return spec.model_copy(update={"gpus": gpus})


def asked_counts(status: Mapping[str, Any]) -> dict[str, int]:
    """Per type, the replicas an allocation holds: the count asked for, or seen when higher."""
    return {name: max(r.desired, r.observed) for name, r in pool_records(status).items()}


def budget_condition(over: Mapping[str, tuple[int, int]], budgets: Mapping[str, int]) -> Condition:
    if not over:
        return Condition(
            BUDGET_LIMITED,
            "False",
            "WithinBudget",
            "the plan fits within the cluster's GPU budgets",
        )
    message = "; ".join(
        f"{name}: the plan would use {wanted}, the cluster budget of {budgets[name]} leaves "
        f"{left} (the other allocations hold the rest)"
        for name, (wanted, left) in over.items()
    )
    return Condition(
        BUDGET_LIMITED, "True", "ClusterBudget", f"{message}; solved within what is left"
    )
