"""The certificate check: is a plan a valid answer to its problem, whatever produced it?

It reads only the problem and the plan (plain arithmetic, no model, no solver), so a defect in the model
builder or a solver's tolerance cannot pass it unnoticed. A plan that fails it is never returned.
"""

from __future__ import annotations

import math

from melange.plan.problem import Problem, replicas_for
from melange.plan.result import Plan

# Costs and fractions are recomputed in floating point: equal within this relative error.
_RELATIVE = 1e-9


def violations(problem: Problem, plan: Plan) -> list[str]:
    """Every way `plan` breaks the rules of `problem` (empty for a valid plan)."""
    found: list[str] = []
    names = [gpu.name for gpu in problem.gpus]
    if [g.name for g in plan.gpus] != names:
        return [f"the plan lists GPU types {[g.name for g in plan.gpus]}, expected {names}"]
    index = {name: g for g, name in enumerate(names)}
    demand = problem.demand_buckets()
    where = {(problem.input_edges[i], problem.output_edges[j]): (i, j) for i, j in demand}
    loads = [0.0] * len(names)
    covered: set[tuple[int, int]] = set()
    for bucket in plan.assignment:
        key = (bucket.input_tokens[0], bucket.output_tokens[0])
        if key not in where or key in covered:
            found.append(f"bucket {key}: not a bucket with traffic, or listed twice")
            continue
        covered.add(key)
        i, j = where[key]
        label = problem.bucket_label(i, j)
        slices = sum(share.slices for share in bucket.shares)
        if slices != problem.slice_factor:
            found.append(f"{label}: {slices} slices assigned, expected {problem.slice_factor}")
        for share in bucket.shares:
            g = index.get(share.gpu)
            if g is None or share.slices < 1:
                found.append(f"{label}: share {share.gpu}={share.slices} is not a type's slices")
                continue
            if not math.isclose(share.fraction, share.slices / problem.slice_factor):
                found.append(f"{label}: {share.gpu}'s fraction does not match its slices")
            throughput = problem.gpus[g].throughput[i][j]
            if throughput <= 0:
                found.append(f"{label}: assigned to {share.gpu}, which cannot serve it")
                continue
            loads[g] += (
                share.slices
                * problem.rates[i][j]
                / problem.slice_factor
                / throughput
                * (1.0 + problem.headroom)
            )
    for i, j in demand:
        if (problem.input_edges[i], problem.output_edges[j]) not in covered:
            found.append(f"{problem.bucket_label(i, j)}: has traffic but no assignment")
    cost = 0.0
    for gpu, result, load in zip(problem.gpus, plan.gpus, loads, strict=True):
        needed = replicas_for(load, gpu.min_replicas)
        if result.replicas < needed:
            found.append(f"{gpu.name}: {result.replicas} replicas carry a load that needs {needed}")
        if gpu.max_replicas is not None and result.replicas > gpu.max_replicas:
            found.append(f"{gpu.name}: {result.replicas} replicas > maxReplicas {gpu.max_replicas}")
        if result.replicas < gpu.min_replicas:
            found.append(f"{gpu.name}: {result.replicas} replicas < minReplicas {gpu.min_replicas}")
        cost += result.replicas * gpu.cost_per_hour
    if plan.cost_per_hour is None or not math.isclose(
        plan.cost_per_hour, cost, rel_tol=_RELATIVE, abs_tol=1e-12
    ):
        found.append(f"the plan's cost {plan.cost_per_hour} differs from its replicas' {cost}")
    return found
