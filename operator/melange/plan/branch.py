"""Branch and bound on the replica counts only, with whole-slice repair at the leaves.

The relaxation keeps every slice count continuous and branches on the (at most 16) replica counts.
Each node is a linear program that HiGHS re-solves from the previous basis in milliseconds. A node whose
replica counts come out whole has a basic solution in which at most one bucket per type is split
between types; `repair` assigns those few buckets in whole slices, and when that cannot be done within
the node's fleet, an exact check decides whether the fleet has any whole-slice assignment at all. A
fleet that has none is excluded with every smaller one, by children that each grow one type.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from melange.plan import highs
from melange.plan.highs import Floats
from melange.plan.instance import Instance


@dataclass(order=True)
class _Node:
    bound: float
    order: int
    lower: Floats = field(compare=False)
    upper: Floats = field(compare=False)


class Relaxation:
    """The counted form with continuous slice counts, kept loaded in one HiGHS instance."""

    def __init__(self, instance: Instance) -> None:
        import highspy

        self.instance = instance
        self.types = len(instance.cost)
        model, self.pair_type, self.pair_bucket = instance.counted(integral=False)
        self.highs = highs.load(replace(model, integer=np.zeros_like(model.integer)))
        self.highs.setOptionValue("presolve", "off")
        self._kind = highspy.HighsModelStatus

    def solve(self, lower: Floats, upper: Floats, time_limit: float | None) -> Floats | bool | None:
        """The solution for replicas within [lower, upper]; False if infeasible, None if out of time."""
        h = self.highs
        h.changeColsBounds(self.types, np.arange(self.types, dtype=np.int32), lower, upper)
        if time_limit is not None:
            h.setOptionValue("time_limit", max(time_limit, 1e-3))
        h.run()
        status = h.getModelStatus()
        if status == self._kind.kOptimal:
            return np.array(h.getSolution().col_value, dtype=np.float64)
        if status in (self._kind.kInfeasible, self._kind.kUnboundedOrInfeasible):
            return False
        return None


def branch_and_bound(
    instance: Instance,
    tolerance: float,
    incumbent: Callable[[], float],
    root: Callable[[Floats, Relaxation], None],
    leaf: Callable[[Floats, Floats, Relaxation], bool | None],
    time_left: Callable[[], float | None],
    unit: float | None,
) -> float:
    """Search the fleets; returns a proven lower bound on the optimum (inf when infeasible).

    `root(x, relaxation)` is called on the first relaxed solution, to find a good plan early;
    `leaf(fleet, x, relaxation)` is called on every node whose replica counts are whole: True when it
    found a plan at that fleet's cost, False when the fleet has no whole-slice assignment, None when
    that could not be decided in time. It may also improve the incumbent, read by `incumbent()`.
    """
    relaxation = Relaxation(instance)
    types = relaxation.types
    counter = itertools.count()

    def grid(value: float) -> float:
        """A bound rounded up to the cost grid: every fleet's cost lies on it."""
        if unit is None:
            return value
        return math.ceil(value / unit - 1e-6) * unit

    heap = [_Node(-math.inf, next(counter), instance.lower.copy(), instance.upper.copy())]
    while heap:
        node = heapq.heappop(heap)
        if node.bound >= incumbent() - tolerance:
            return min(incumbent(), node.bound)  # best-first: every open node is at least this
        left = time_left()
        if left is not None and left <= 0:
            return node.bound
        x = relaxation.solve(node.lower, node.upper, left)
        if x is False:
            continue
        if x is None:
            return node.bound
        assert isinstance(x, np.ndarray)
        if node.order == 0:
            root(x, relaxation)
        bound = max(node.bound, grid(float(instance.cost @ x[:types])))
        if bound >= incumbent() - tolerance:
            continue
        replicas = x[:types]
        fraction = np.abs(replicas - np.rint(replicas))
        if fraction.max() <= 1e-6:
            fleet = np.rint(replicas)
            found = leaf(fleet, x, relaxation)
            if found is None:
                return bound
            if found:
                continue
            for g in range(types):  # the fleet has no assignment: grow one type, in disjoint ways
                if fleet[g] + 1 > node.upper[g]:
                    continue
                lower, upper = node.lower.copy(), node.upper.copy()
                lower[g] = fleet[g] + 1
                upper[:g] = np.minimum(upper[:g], fleet[:g])
                if np.all(lower <= upper):
                    heapq.heappush(heap, _Node(bound, next(counter), lower, upper))
            continue
        g = int(np.argmax(fraction * instance.cost))
        down, up = node.upper.copy(), node.lower.copy()
        down[g] = math.floor(replicas[g])
        up[g] = math.ceil(replicas[g])
        heapq.heappush(heap, _Node(bound, next(counter), node.lower.copy(), down))
        heapq.heappush(heap, _Node(bound, next(counter), up, node.upper.copy()))
    return min(incumbent(), math.inf)
