"""An oracle for small instances, independent of the solver: every assignment of slices, enumerated.

Buckets are taken one by one; each state is the load every type carries so far (equal states are
kept once, states over a cap dropped). At the end each state's fleet is priced by the plan rules (`replicas_for`), the same rules the
certificate check applies. Loads are added in the same order and with the same arithmetic as a plan
reports them, so a borderline load rounds the same way in both.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

from melange.plan.problem import Problem, replicas_for


def _compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every way to write `total` as an ordered sum of `parts` non-negative integers."""
    for cuts in itertools.combinations(range(total + parts - 1), parts - 1):
        bounds = (-1, *cuts, total + parts - 1)
        yield tuple(bounds[k + 1] - bounds[k] - 1 for k in range(parts))


# The most assignments the oracle may have to enumerate for a generated instance: past this it can
# take minutes (the states it keeps multiply bucket by bucket).
MAX_ASSIGNMENTS = 200_000


def assignments(problem: Problem) -> int:
    """How many ways there are to assign every bucket's slices: the oracle's worst case."""
    total = 1
    for i, j in problem.demand_buckets():
        able = sum(1 for gpu in problem.gpus if gpu.throughput[i][j] > 0)
        if able:
            total *= math.comb(problem.slice_factor + able - 1, able - 1)
    return total


def optimum(problem: Problem) -> float | None:
    """The least cost of any plan, or None when there is none."""
    gpus = problem.gpus
    caps = [float("inf") if g.max_replicas is None else g.max_replicas for g in gpus]
    states: list[tuple[float, ...]] = [tuple(0.0 for _ in gpus)]
    for i, j in problem.demand_buckets():
        able = [g for g, gpu in enumerate(gpus) if gpu.throughput[i][j] > 0]
        if not able:
            return None
        grown = set()
        for state in states:
            for parts in _compositions(problem.slice_factor, len(able)):
                loads = list(state)
                for g, slices in zip(able, parts, strict=True):
                    if slices:
                        loads[g] += (
                            slices
                            * problem.rates[i][j]
                            / problem.slice_factor
                            / gpus[g].throughput[i][j]
                            * (1.0 + problem.headroom)
                        )
                if all(replicas_for(load) <= cap for load, cap in zip(loads, caps, strict=True)):
                    grown.add(tuple(loads))
        states = list(grown)
    costs = [
        sum(
            replicas_for(load, gpu.min_replicas) * gpu.cost_per_hour
            for load, gpu in zip(state, gpus, strict=True)
        )
        for state in states
        if all(
            replicas_for(load, gpu.min_replicas) <= cap
            for load, gpu, cap in zip(state, gpus, caps, strict=True)
        )
    ]
    return min(costs) if costs else None
