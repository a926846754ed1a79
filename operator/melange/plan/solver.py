"""The Mélange ILP, solved exactly and certified: the cheapest integer mix of GPU instances.

Counted form: `k[g, b]` in 0..S slices of bucket b go to type g; `n[g]` replicas cover their load.
The default method is a decomposition that branches on the replica counts only:

1. the relaxation with integer `n` and continuous `k` (16 integer variables at most) gives a fleet and
   a lower bound that in practice equals the optimum;
2. a basic solution of it splits at most one bucket per type between types; a small MILP over those
   few buckets repairs them to whole slices at the least extra cost;
3. when the repair costs more than the bound, the fleet itself is checked for any whole-slice
   assignment; a fleet that has none is cut off (with every smaller one) and step 1 runs again.

`direct` hands the whole counted form to HiGHS instead. Either way the plan is certified by
`certify.violations` before it is returned, a greedy plan is the floor when time runs out, and
`Optimal` is said only when the plan is within one cost unit of a proven lower bound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from melange.api import AllocationSpec
from melange.plan import certify, floors, highs
from melange.plan.branch import Relaxation, branch_and_bound
from melange.plan.highs import Floats, Ints
from melange.plan.instance import Instance
from melange.plan.problem import Problem, cost_unit, replicas_for
from melange.plan.result import (
    DEFAULT_METHOD,
    BucketAssignment,
    GpuResult,
    Method,
    Plan,
    Share,
)

DEFAULT_TIME_LIMIT = 60.0


class _Clock:
    """The time left of a limit that started counting before the solve (parsing included)."""

    def __init__(self, limit: float | None, started: float | None) -> None:
        self.deadline = None if limit is None else (started or time.monotonic()) + limit

    def left(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def expired(self) -> bool:
        left = self.left()
        return left is not None and left <= 0.0


@dataclass
class _Search:
    """The best certified plan so far and the best proven bound."""

    instance: Instance
    tolerance: float
    bound: float
    plan: Plan | None = None
    counts: Ints | None = None
    rejected: str | None = None

    def offer(self, counts: Ints) -> None:
        """Keep `counts` as the incumbent if it is a certified plan cheaper than the incumbent."""
        plan = _plan_of(self.instance, counts)
        problems = certify.violations(self.instance.problem, plan)
        if problems:
            self.rejected = "; ".join(problems[:3])
            return
        assert plan.cost_per_hour is not None
        if self.plan is None or plan.cost_per_hour < (self.plan.cost_per_hour or 0.0) - 1e-12:
            self.plan, self.counts = plan, counts

    @property
    def cost(self) -> float:
        return (
            np.inf
            if self.plan is None or self.plan.cost_per_hour is None
            else self.plan.cost_per_hour
        )

    def proven(self) -> bool:
        return self.cost - self.bound <= self.tolerance


def _plan_of(instance: Instance, counts: Ints) -> Plan:
    """Slice counts [canonical type, canonical bucket] as a plan in the problem's own order."""
    problem = instance.problem
    where = {bucket: b for b, bucket in enumerate(instance.buckets)}
    canonical = {g: c for c, g in enumerate(instance.types)}
    loads = [0.0] * len(problem.gpus)
    assignment = []
    for i, j in problem.demand_buckets():
        b = where[i, j]
        shares = []
        for g, gpu in enumerate(problem.gpus):
            slices = int(counts[canonical[g], b])
            if slices:
                loads[g] += (
                    slices
                    * problem.rates[i][j]
                    / problem.slice_factor
                    / gpu.throughput[i][j]
                    * (1.0 + problem.headroom)
                )
                shares.append(Share(gpu.name, slices, slices / problem.slice_factor))
        assignment.append(
            BucketAssignment(
                (problem.input_edges[i], problem.input_edges[i + 1]),
                (problem.output_edges[j], problem.output_edges[j + 1]),
                problem.rates[i][j],
                tuple(shares),
            )
        )
    gpus = []
    for gpu, load in zip(problem.gpus, loads, strict=True):
        replicas = replicas_for(load, gpu.min_replicas)
        served = load / (1.0 + problem.headroom)
        gpus.append(
            GpuResult(
                name=gpu.name,
                replicas=replicas,
                cost_per_hour=replicas * gpu.cost_per_hour,
                utilization=served / replicas if replicas else 0.0,
                load=served,
            )
        )
    return Plan(
        status="Feasible",
        gpus=tuple(gpus),
        cost_per_hour=sum(g.cost_per_hour for g in gpus),
        assignment=tuple(assignment),
    )


def _counts(instance: Instance, x: Floats, pair_type: Ints, pair_bucket: Ints) -> Ints:
    counts = np.zeros(instance.served.shape, dtype=np.int32)
    types = len(instance.cost)
    counts[pair_type, pair_bucket] = np.rint(x[types : types + len(pair_type)]).astype(np.int32)
    return counts


def _repair(search: _Search, x: Floats, pair_type: Ints, pair_bucket: Ints, clock: _Clock) -> None:
    """Keep the buckets a relaxed solution gave whole slices; re-assign the split ones in whole
    slices, growing the fleet where they do not fit, at the least extra cost."""
    instance = search.instance
    types = len(instance.cost)
    k = x[types : types + len(pair_type)]
    split = np.unique(pair_bucket[np.abs(k - np.rint(k)) > 1e-6]).astype(np.int32)
    whole = ~np.isin(pair_bucket, split)
    counts = np.zeros(instance.served.shape, dtype=np.int32)
    counts[pair_type[whole], pair_bucket[whole]] = np.rint(k[whole]).astype(np.int32)
    if len(split) == 0:
        search.offer(counts)
        return
    fixed_load = (counts * instance.slice_load).sum(axis=1)
    model, rt, rb = instance.counted(integral=True, buckets=split, fixed_load=fixed_load)
    repaired = highs.solve(model, clock.left(), abs_gap=search.tolerance, presolve=False)
    if repaired.x is not None:
        search.offer(counts + _counts(instance, repaired.x, rt, rb))


def _decompose(search: _Search, clock: _Clock, unit: float | None) -> bool:
    """Branch on fleets (see `branch`); False when infeasibility is proven."""
    instance = search.instance

    def repair(x: Floats, relaxation: Relaxation) -> None:
        _repair(search, x, relaxation.pair_type, relaxation.pair_bucket, clock)

    def leaf(fleet: Floats, x: Floats, relaxation: Relaxation) -> bool | None:
        repair(x, relaxation)
        if search.cost <= float(instance.cost @ fleet) + search.tolerance:
            return True
        model, pair_type, pair_bucket = instance.counted(
            integral=True, lower=fleet, upper=fleet, objective=False
        )
        check = highs.solve(model, clock.left(), presolve=False)
        if check.x is not None:
            search.offer(_counts(instance, check.x, pair_type, pair_bucket))
            return True
        return False if check.outcome == "infeasible" else None

    bound = branch_and_bound(
        instance, search.tolerance, lambda: search.cost, repair, leaf, clock.left, unit
    )
    search.bound = max(search.bound, bound)
    return search.plan is not None or bound < np.inf


def _direct(search: _Search, clock: _Clock) -> bool:
    """The whole counted form in HiGHS; False when proven infeasible.

    No start solution is passed: given the incumbent as a start, HiGHS 1.16 returned, on one corpus
    instance, a solution vector that did not match its own objective (the certificate check caught
    it, and the plan came back `Feasible` instead of `Optimal`).
    """
    instance = search.instance
    model, pair_type, pair_bucket = instance.counted(integral=True)
    result = highs.solve(model, clock.left(), abs_gap=search.tolerance)
    if result.outcome == "infeasible":
        return search.plan is not None
    search.bound = max(search.bound, result.bound)
    if result.x is not None:
        search.offer(_counts(instance, result.x, pair_type, pair_bucket))
    return True


def solve(
    problem: Problem,
    method: Method = DEFAULT_METHOD,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
    started: float | None = None,
) -> Plan:
    """The cheapest certified plan; infeasibility is an answer with a reason, never an exception.

    `time_limit` counts from `started` (a `time.monotonic()` reading; default: now), so a caller can
    include its own parsing in it. When it runs out the best plan so far is returned as `Feasible`.
    """
    began = time.perf_counter()
    clock = _Clock(time_limit, started)
    common = {
        "total_rate": problem.total_rate,
        "method": method,
        "baselines": floors.baselines(problem),
    }

    def finish(**fields: object) -> Plan:
        return Plan(solve_seconds=time.perf_counter() - began, **common, **fields)  # type: ignore[arg-type]

    unservable = problem.unservable()
    if unservable:
        return finish(status="Infeasible", reason="; ".join(unservable))
    instance = Instance.of(problem)
    unit = cost_unit([gpu.cost_per_hour for gpu in problem.gpus])
    search = _Search(instance, tolerance=0.0, bound=instance.lower_bound())
    for counts in floors.single_type(instance):
        search.offer(counts)
    greedy = floors.greedy(instance)
    if greedy is not None:
        search.offer(greedy)
    scale = max(1.0, search.cost if np.isfinite(search.cost) else float(instance.cost.sum()))
    search.tolerance = 0.999 * unit if unit else 1e-9 * scale
    if not instance.buckets:
        search.offer(np.zeros(instance.served.shape, dtype=np.int32))
    feasible = True
    if not search.proven():
        feasible = _direct(search, clock) if method == "direct" else _decompose(search, clock, unit)
        left = clock.left()
        if feasible and search.plan is None and method != "direct" and (left is None or left > 0):
            # The relaxation could not decide (HiGHS answered "unknown", e.g. on costs near the
            # smallest float): with time left, the whole model decides instead.
            feasible = _direct(search, clock)
    if not feasible:
        return finish(status="Infeasible", reason=problem.capped_reason())
    if search.plan is None:
        reason = f"no plan found within the {time_limit} s time limit"
        if search.rejected:
            reason += f" (a plan failed the certificate check: {search.rejected})"
        return finish(status="Unsolved", reason=reason, lower_bound=search.bound)
    cost = search.cost
    proven = search.proven()
    return finish(
        status="Optimal" if proven else "Feasible",
        reason=None if proven else "time limit reached before optimality was proven",
        gpus=search.plan.gpus,
        cost_per_hour=cost,
        lower_bound=min(cost, search.bound),
        assignment=search.plan.assignment,
    )


def solve_spec(
    spec: AllocationSpec,
    rate: float | None = None,
    slice_factor: int | None = None,
    method: Method = DEFAULT_METHOD,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
) -> Plan:
    return solve(Problem.from_spec(spec, rate=rate, slice_factor=slice_factor), method, time_limit)


def per_type_loads(problem: Problem, plan: Plan) -> list[float]:
    """Instances' worth of traffic each type carries in a plan, recomputed from its assignment."""
    index = {gpu.name: g for g, gpu in enumerate(problem.gpus)}
    loads = [0.0] * len(problem.gpus)
    for bucket in plan.assignment:
        i = problem.input_edges.index(bucket.input_tokens[0])
        j = problem.output_edges.index(bucket.output_tokens[0])
        for share in bucket.shares:
            g = index[share.gpu]
            loads[g] += bucket.rate * share.fraction / problem.gpus[g].throughput[i][j]
    return loads
