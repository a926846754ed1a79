"""Plans found without search: the single-type baselines and a greedy plan that respects the caps.

They are what Mélange is compared against, and the floor under every solve: a feasible problem always
gets a plan, however short its time limit.
"""

from __future__ import annotations

import numpy as np

from melange.plan.highs import Ints
from melange.plan.instance import Instance
from melange.plan.problem import LOAD_EPSILON, Problem, replicas_for
from melange.plan.result import Baseline


def baselines(problem: Problem) -> tuple[Baseline, ...]:
    """For each type, the plan that sends every request to it alone."""
    result = []
    demand = problem.demand_buckets()
    for gpu in problem.gpus:
        unservable = [(i, j) for i, j in demand if gpu.throughput[i][j] <= 0]
        if unservable:
            i, j = unservable[0]
            result.append(
                Baseline(gpu.name, None, None, f"cannot serve {problem.bucket_label(i, j)}")
            )
            continue
        load = sum(problem.rates[i][j] / gpu.throughput[i][j] for i, j in demand)
        replicas = replicas_for(load * (1.0 + problem.headroom), gpu.min_replicas)
        if gpu.max_replicas is not None and replicas > gpu.max_replicas:
            result.append(
                Baseline(gpu.name, None, None, f"needs {replicas} > maxReplicas {gpu.max_replicas}")
            )
            continue
        result.append(Baseline(gpu.name, replicas, replicas * gpu.cost_per_hour))
    return tuple(result)


def single_type(instance: Instance) -> list[Ints]:
    """Slice counts [type, bucket] of every plan that sends all traffic to one type."""
    plans = []
    for g in np.nonzero(instance.served.all(axis=1))[0]:
        counts = np.zeros(instance.served.shape, dtype=np.int32)
        counts[g] = instance.slices
        plans.append(counts)
    return plans


def greedy(instance: Instance) -> Ints | None:
    """Each bucket, largest first, to the type it makes least dearer, slice by slice where a cap
    binds; None when a slice fits under no type's maxReplicas."""
    types, buckets = instance.served.shape
    counts = np.zeros((types, buckets), dtype=np.int32)
    load = np.zeros(types)
    # replicas_for(load) = ceil(load - LOAD_EPSILON) <= maxReplicas exactly when load <= this
    cap = instance.upper + LOAD_EPSILON
    floor = np.maximum(instance.lower, 0.0)

    def price(b: int, extra: np.ndarray) -> np.ndarray:
        after = np.maximum(floor, np.ceil(load + extra - LOAD_EPSILON))
        before = np.maximum(floor, np.ceil(load - LOAD_EPSILON))
        marginal = instance.cost * (after - before) + 1e-9 * instance.cost * extra
        return np.where(instance.served[:, b] & (load + extra <= cap), marginal, np.inf)

    for b in np.argsort(-instance.slice_load.max(axis=0), kind="stable"):
        whole = price(b, instance.slice_load[:, b] * instance.slices)
        g = int(np.argmin(whole))
        if np.isfinite(whole[g]):
            counts[g, b] = instance.slices
            load[g] += instance.slice_load[g, b] * instance.slices
            continue
        for _ in range(instance.slices):
            one = price(b, instance.slice_load[:, b])
            g = int(np.argmin(one))
            if not np.isfinite(one[g]):
                return None
            counts[g, b] += 1
            load[g] += instance.slice_load[g, b]
    return counts
