"""Which plan to act on: the cheapest, within the capacity caps, unless the current mix is close.

Every change of the mix restarts model servers and waits for nodes, so with `spec.minSavings` a
re-solve keeps what runs unless the cheapest plan saves more than that fraction of the cost:
- first the current counts themselves, re-evaluated at the new rate (still enough? then nothing
  moves at all);
- else the current mix of types, resized for the new rate (counts change; every type that runs keeps
  at least one replica, and no type comes in).
The kept plan is `Optimal` only when it costs no more than the proven optimum; otherwise it is a
`Feasible` plan whose gap to the optimum's lower bound the status shows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from melange.api import AllocationSpec, GpuType
from melange.controller import decide
from melange.controller.transition import Cap
from melange.plan import certify, solver
from melange.plan.problem import Problem
from melange.plan.result import Plan

COST_TIE = 1e-9  # relative: costs this close are the same cost
# relative cost added per priority step below the highest: small enough to break ties only
PRIORITY_NUDGE = 1e-6


@dataclass(frozen=True)
class Choice:
    plan: Plan
    note: str | None = None  # why the plan is not simply the cheapest one
    # per type short of its cluster budget: (what the plan would use, what the budget leaves)
    over_budget: dict[str, tuple[int, int]] = field(default_factory=dict)


def _pinned(gpu: GpuType, count: int) -> GpuType:
    """A type fixed at `count` (within its own bounds)."""
    count = max(count, gpu.min_replicas)
    if gpu.max_replicas is not None:
        count = min(count, gpu.max_replicas)
    return gpu.model_copy(update={"min_replicas": count, "max_replicas": count})


def _without(gpu: GpuType) -> GpuType:
    """A type left out of the mix (at its minReplicas)."""
    return gpu.model_copy(update={"max_replicas": gpu.min_replicas})


def _kept(gpu: GpuType) -> GpuType:
    """A type of the mix that stays in it: at least one replica (within its maxReplicas)."""
    if gpu.max_replicas == 0:
        return gpu
    return gpu.model_copy(update={"min_replicas": max(gpu.min_replicas, 1)})


def choose_plan(
    spec: AllocationSpec,
    rate: float | None,
    caps: Mapping[str, Cap] | None = None,
    current: Mapping[str, int] | None = None,
    budgets: Mapping[str, int] | None = None,
) -> Choice:
    """The plan to act on for this rate, given the caps in force, the counts running now and
    what the cluster's budgets leave this allocation (`budgets`: per type, a hard limit)."""
    capped = decide.capped_spec(spec, caps or {})
    best = solver.solve_spec(capped, rate)
    note = None
    if caps and not best.solved:
        uncapped = solver.solve_spec(spec, rate)
        if uncapped.solved:
            best, capped = uncapped, spec
            note = "no plan fits within the capacity caps, so the full counts are asked for"
    over: dict[str, tuple[int, int]] = {}
    if budgets and best.solved:
        wanted = decide.desired_replicas(capped, best)
        over = {n: (wanted[n], left) for n, left in budgets.items() if wanted.get(n, 0) > left}
        if over:
            capped = decide.budgeted_spec(capped, budgets)
            best = solver.solve_spec(capped, rate)
            if not best.solved:
                shown = ", ".join(f"{n} has {left} left" for n, (_, left) in over.items())
                reason = f"no plan fits within the cluster's GPU budgets ({shown}); {best.reason}"
                return Choice(replace(best, reason=reason), note, over)
    best = by_priority(capped, rate, best)
    if spec.min_savings is None or not current or not best.solved:
        return Choice(best, note, over)
    desired = decide.desired_replicas(capped, best)
    if all(current.get(name, 0) == count for name, count in desired.items()):
        return Choice(best, note, over)
    candidates = (
        (
            "the current counts still serve the rate",
            [_pinned(g, current.get(g.name, 0)) for g in capped.gpus],
        ),
        (
            "the current mix of types, resized",
            [_kept(g) if current.get(g.name, 0) > 0 else _without(g) for g in capped.gpus],
        ),
    )
    for what, gpus in candidates:
        kept = solver.solve_spec(capped.model_copy(update={"gpus": gpus}), rate)
        if not kept.solved:
            continue
        assert kept.cost_per_hour is not None
        assert best.cost_per_hour is not None
        saving = kept.cost_per_hour - best.cost_per_hour
        if saving > spec.min_savings * kept.cost_per_hour:
            break  # the cheapest plan saves enough: take it
        same = saving <= COST_TIE * max(kept.cost_per_hour, 1.0)
        plan = replace(
            kept,
            status=best.status if same else "Feasible",
            lower_bound=best.lower_bound,
            baselines=best.baselines,
        )
        share = saving / kept.cost_per_hour if kept.cost_per_hour else 0.0
        return Choice(
            plan,
            f"kept: {what} ({kept.cost_per_hour:.2f}/h); the cheapest plan "
            f"({best.cost_per_hour:.2f}/h) would save {share:.1%}, not more than "
            f"minSavings {spec.min_savings:.1%}",
            over,
        )
    return Choice(best, note, over)


def by_priority(spec: AllocationSpec, rate: float | None, best: Plan) -> Plan:
    """Among the plans as cheap as `best`, one that prefers the higher-priority types.

    The spec is solved again with each type's cost nudged up by PRIORITY_NUDGE per step below the
    highest priority; that plan is taken only when its real cost is `best`'s, so it is as proven
    as `best` (the same lower bound covers it) and passes the same certificate at the real prices.
    """
    if not best.solved or all(g.priority is None for g in spec.gpus):
        return best
    assert best.cost_per_hour is not None
    top = max(g.priority or 0 for g in spec.gpus)
    nudged = spec.model_copy(
        update={
            "gpus": [
                g.model_copy(
                    update={
                        "cost_per_hour": g.cost_per_hour
                        * (1 + PRIORITY_NUDGE * (top - (g.priority or 0)))
                    }
                )
                for g in spec.gpus
            ]
        }
    )
    alternative = solver.solve_spec(nudged, rate)
    if not alternative.solved:
        return best
    prices = {g.name: g.cost_per_hour for g in spec.gpus}
    gpus = tuple(replace(g, cost_per_hour=g.replicas * prices[g.name]) for g in alternative.gpus)
    cost = sum(g.cost_per_hour for g in gpus)
    if cost > best.cost_per_hour * (1 + COST_TIE):
        return best
    plan = replace(
        alternative,
        status=best.status,
        reason=best.reason,
        gpus=gpus,
        cost_per_hour=cost,
        lower_bound=best.lower_bound,
        baselines=best.baselines,
    )
    if certify.violations(Problem.from_spec(spec, rate=rate), plan):
        return best
    return plan
