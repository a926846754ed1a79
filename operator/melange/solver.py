"""The Mélange ILP: the cheapest integer mix of GPU instances that serves a workload.

Counted form: for every bucket b with demand and GPU type g that can serve it, an integer
`x[g,b] in 0..S` counts how many of the bucket's S equal slices go to g. It has the same optimum as one
binary per slice, without the S! symmetric copies of each solution that make the per-slice form slow.
Pure: no Kubernetes, no network; the backends (HiGHS in process, CBC as a bundled binary) are PuLP's.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import pulp

from melange.api import AllocationSpec, bucket_label

Backend = Literal["highs", "cbc"]
BACKENDS: tuple[Backend, ...] = ("cbc", "highs")
# CBC proves optimality several times faster than HiGHS on this model once it has hundreds of
# integer columns (benchmarks/solver.py: 0.4-1.2 s against 1.9-5.3 s at 8 types x 20x20 buckets);
# HiGHS wins only on tiny instances, by the ~20 ms CBC takes to start as a subprocess.
DEFAULT_BACKEND: Backend = "cbc"
Status = Literal["Optimal", "Feasible", "Infeasible"]

# Loads within this of an integer count as that integer: solver tolerances must not buy a GPU.
_LOAD_EPSILON = 1e-7


@dataclass(frozen=True)
class GpuOption:
    """One GPU type as the solver sees it."""

    name: str
    cost_per_hour: float
    throughput: tuple[tuple[float, ...], ...]
    min_replicas: int = 0
    max_replicas: int | None = None


@dataclass(frozen=True)
class Problem:
    """A solver instance: per-bucket request rates (req/s) and the GPU types to choose from."""

    input_edges: tuple[int, ...]
    output_edges: tuple[int, ...]
    rates: tuple[tuple[float, ...], ...]
    gpus: tuple[GpuOption, ...]
    slice_factor: int = 8
    headroom: float = 0.0

    @classmethod
    def from_spec(
        cls, spec: AllocationSpec, rate: float | None = None, slice_factor: int | None = None
    ) -> Problem:
        """Turn a validated spec into rates: bucket (i, j) gets `R * D[i][j] / sum(D)`."""
        total_rate = spec.workload.total_rate if rate is None else rate
        weight = sum(sum(row) for row in spec.workload.distribution)
        scale = total_rate / weight if weight > 0 else 0.0
        return cls(
            input_edges=tuple(spec.buckets.input_tokens),
            output_edges=tuple(spec.buckets.output_tokens),
            rates=tuple(tuple(v * scale for v in row) for row in spec.workload.distribution),
            gpus=tuple(
                GpuOption(
                    name=g.name,
                    cost_per_hour=g.cost_per_hour,
                    throughput=tuple(tuple(row) for row in g.throughput),
                    min_replicas=g.min_replicas,
                    max_replicas=g.max_replicas,
                )
                for g in spec.gpus
            ),
            slice_factor=spec.slice_factor if slice_factor is None else slice_factor,
            headroom=spec.headroom,
        )

    @property
    def total_rate(self) -> float:
        return sum(sum(row) for row in self.rates)

    def demand_buckets(self) -> list[tuple[int, int]]:
        """Buckets with traffic, in row-major order."""
        return [
            (i, j) for i, row in enumerate(self.rates) for j, rate in enumerate(row) if rate > 0
        ]

    def bucket_label(self, i: int, j: int) -> str:
        return bucket_label(self.input_edges, self.output_edges, i, j)

    def slice_load(self, g: int, i: int, j: int) -> float:
        """Instances of type g that one slice of bucket (i, j) occupies, headroom included."""
        return (
            self.rates[i][j]
            / self.slice_factor
            / self.gpus[g].throughput[i][j]
            * (1.0 + self.headroom)
        )


@dataclass(frozen=True)
class GpuResult:
    name: str
    replicas: int
    cost_per_hour: float
    utilization: float  # served load / replicas: the share of the instances' capacity in use
    load: float  # instances' worth of traffic assigned, before headroom


@dataclass(frozen=True)
class Share:
    gpu: str
    fraction: float


@dataclass(frozen=True)
class BucketAssignment:
    """Where one bucket's traffic goes: the router sends `fraction` of it to `gpu`."""

    input_tokens: tuple[int, int]
    output_tokens: tuple[int, int]
    rate: float
    shares: tuple[Share, ...]


@dataclass(frozen=True)
class Baseline:
    """The cheapest plan that uses one GPU type alone (what Mélange is compared against)."""

    gpu: str
    replicas: int | None
    cost_per_hour: float | None
    reason: str | None = None


@dataclass(frozen=True)
class Plan:
    status: Status
    reason: str | None = None
    gpus: tuple[GpuResult, ...] = ()
    cost_per_hour: float | None = None
    lower_bound: float | None = None
    assignment: tuple[BucketAssignment, ...] = ()
    baselines: tuple[Baseline, ...] = ()
    total_rate: float = 0.0
    solve_seconds: float = 0.0
    backend: str = DEFAULT_BACKEND

    @property
    def solved(self) -> bool:
        return self.status != "Infeasible"

    @property
    def gap(self) -> float | None:
        """Relative distance to the LP bound: how much a better plan could possibly save."""
        if self.cost_per_hour is None or self.lower_bound is None:
            return None
        if self.cost_per_hour <= 0:
            return 0.0
        return max(0.0, (self.cost_per_hour - self.lower_bound) / self.cost_per_hour)

    @property
    def best_baseline(self) -> Baseline | None:
        feasible = [b for b in self.baselines if b.cost_per_hour is not None]
        return min(feasible, key=lambda b: (b.cost_per_hour, b.gpu)) if feasible else None

    @property
    def saving(self) -> float | None:
        """Fraction saved against the cheapest single-type plan."""
        best = self.best_baseline
        if best is None or best.cost_per_hour is None or self.cost_per_hour is None:
            return None
        if best.cost_per_hour <= 0:
            return 0.0
        return (best.cost_per_hour - self.cost_per_hour) / best.cost_per_hour

    def replicas(self) -> dict[str, int]:
        return {g.name: g.replicas for g in self.gpus}


@dataclass
class _Model:
    """A built PuLP model and the variables needed to read the answer back."""

    problem: pulp.LpProblem
    counts: dict[tuple[int, int, int], pulp.LpVariable] = field(default_factory=dict)
    instances: list[pulp.LpVariable] = field(default_factory=list)


def _ceil_load(load: float) -> int:
    return max(0, math.ceil(load - _LOAD_EPSILON))


def _build(problem: Problem, integer: bool) -> _Model:
    category = pulp.LpInteger if integer else pulp.LpContinuous
    model = _Model(pulp.LpProblem("melange", pulp.LpMinimize))
    for g, gpu in enumerate(problem.gpus):
        model.instances.append(
            model.problem.add_variable(
                f"n_{g}", lowBound=gpu.min_replicas, upBound=gpu.max_replicas, cat=category
            )
        )
    loads: list[list[tuple[pulp.LpVariable, float]]] = [[] for _ in problem.gpus]
    for i, j in problem.demand_buckets():
        slices = []
        for g, gpu in enumerate(problem.gpus):
            if gpu.throughput[i][j] <= 0:
                continue  # zero throughput: g cannot serve this bucket, and must not be divided by
            var = model.problem.add_variable(
                f"x_{g}_{i}_{j}", 0, problem.slice_factor, cat=category
            )
            model.counts[g, i, j] = var
            slices.append((var, 1.0))
            loads[g].append((var, problem.slice_load(g, i, j)))
        model.problem += pulp.LpAffineExpression(slices) == problem.slice_factor, f"cover_{i}_{j}"
    for g, terms in enumerate(loads):
        if terms:
            model.problem += (
                pulp.LpAffineExpression(terms) <= model.instances[g],
                f"capacity_{g}",
            )
    model.problem += pulp.LpAffineExpression(
        [(n, gpu.cost_per_hour) for n, gpu in zip(model.instances, problem.gpus, strict=True)]
    )
    return model


@functools.cache
def _silence_highs_banner() -> None:
    """HiGHS prints a banner to the C stdout when its first instance is built, before any option can
    turn it off; `melange solve -o json` must print JSON alone, so build that first one muted."""
    import highspy

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            highspy.Highs()  # type: ignore[no-untyped-call]
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def cost_unit(costs: Sequence[float]) -> float | None:
    """The coarsest grid all costs lie on (0.01 for cents), if any up to 1e-6.

    Every plan's cost is then a multiple of it, so an incumbent within less than one unit of the
    bound is proven optimal: an exact stopping rule, where a relative gap would accept near-optima.
    """
    for decimals in range(7):
        unit = 10.0**-decimals
        if all(abs(c / unit - round(c / unit)) < 1e-6 for c in costs):
            return unit
    return None


def _backend(name: Backend, time_limit: float | None, unit: float | None = None) -> pulp.LpSolver:
    gaps = {"gapAbs": 0.999 * unit, "gapRel": 0.0} if unit else {"gapRel": 1e-6}
    if name == "highs":
        _silence_highs_banner()
        return pulp.HiGHS(msg=False, timeLimit=time_limit, threads=1, **gaps)
    if name == "cbc":
        with warnings.catch_warnings():
            # PuLP 3 warns that the bundled CBC moves to an extra in PuLP 4; we pin PuLP < 4.
            warnings.simplefilter("ignore", DeprecationWarning)
            return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, threads=1, **gaps)
    raise ValueError(f"unknown solver backend {name!r}, expected one of {', '.join(BACKENDS)}")


def _unservable(problem: Problem) -> list[str]:
    reasons = []
    for i, j in problem.demand_buckets():
        if all(gpu.throughput[i][j] <= 0 for gpu in problem.gpus):
            reasons.append(
                f"no GPU type can serve {problem.bucket_label(i, j)} "
                f"({problem.rates[i][j]:.4g} req/s)"
            )
    return reasons


def _capped_reason(problem: Problem) -> str:
    capped = [
        f"{gpu.name} (maxReplicas {gpu.max_replicas})"
        for g, gpu in enumerate(problem.gpus)
        if gpu.max_replicas is not None
        and any(gpu.throughput[i][j] > 0 for i, j in problem.demand_buckets())
    ]
    return (
        f"the demand of {problem.total_rate:.4g} req/s does not fit within maxReplicas of "
        + ", ".join(capped)
    )


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
        replicas = max(gpu.min_replicas, _ceil_load(load * (1.0 + problem.headroom)))
        if gpu.max_replicas is not None and replicas > gpu.max_replicas:
            result.append(
                Baseline(gpu.name, None, None, f"needs {replicas} > maxReplicas {gpu.max_replicas}")
            )
            continue
        result.append(Baseline(gpu.name, replicas, replicas * gpu.cost_per_hour))
    return tuple(result)


def _lower_bound(problem: Problem, backend: Backend) -> float | None:
    model = _build(problem, integer=False)
    model.problem.solve(_backend(backend, None))
    if model.problem.status != pulp.LpStatusOptimal:
        return None
    return float(pulp.value(model.problem.objective) or 0.0)


def _read_plan(problem: Problem, model: _Model) -> tuple[list[GpuResult], list[BucketAssignment]]:
    """Round the solver's counts to integers and recompute the instances they need exactly."""
    slices = {key: round(var.value() or 0.0) for key, var in model.counts.items()}
    loads = [0.0] * len(problem.gpus)
    assignment = []
    for i, j in problem.demand_buckets():
        shares = []
        for g, gpu in enumerate(problem.gpus):
            count = slices.get((g, i, j), 0)
            if count:
                loads[g] += count * problem.slice_load(g, i, j)
                shares.append(Share(gpu.name, count / problem.slice_factor))
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
        replicas = max(gpu.min_replicas, _ceil_load(load))
        if gpu.max_replicas is not None:
            replicas = min(replicas, gpu.max_replicas)
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
    return gpus, assignment


def solve(
    problem: Problem, backend: Backend = DEFAULT_BACKEND, time_limit: float | None = 60.0
) -> Plan:
    """Solve the counted-form ILP; infeasibility is an answer with a reason, not an exception."""
    started = time.perf_counter()
    common = {"total_rate": problem.total_rate, "backend": backend}
    base = baselines(problem)

    def finish(**kwargs: object) -> Plan:
        return Plan(
            baselines=base,
            solve_seconds=time.perf_counter() - started,
            **common,  # type: ignore[arg-type]
            **kwargs,  # type: ignore[arg-type]
        )

    unservable = _unservable(problem)
    if unservable:
        return finish(status="Infeasible", reason="; ".join(unservable))
    if not problem.demand_buckets():
        gpus, assignment = _read_plan(problem, _Model(pulp.LpProblem("idle")))
        cost = sum(g.cost_per_hour for g in gpus)
        return finish(status="Optimal", gpus=tuple(gpus), cost_per_hour=cost, lower_bound=cost)
    lower_bound = _lower_bound(problem, backend)
    if lower_bound is None:
        return finish(status="Infeasible", reason=_capped_reason(problem))
    model = _build(problem, integer=True)
    unit = cost_unit([gpu.cost_per_hour for gpu in problem.gpus])
    model.problem.solve(_backend(backend, time_limit, unit))
    if model.problem.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        if model.problem.status == pulp.LpStatusInfeasible:
            return finish(status="Infeasible", reason=_capped_reason(problem))
        return finish(
            status="Infeasible",
            reason=f"no integer plan found within the {time_limit} s time limit",
        )
    gpus, assignment = _read_plan(problem, model)
    status: Status = "Optimal" if model.problem.sol_status == pulp.LpSolutionOptimal else "Feasible"
    return finish(
        status=status,
        gpus=tuple(gpus),
        cost_per_hour=sum(g.cost_per_hour for g in gpus),
        lower_bound=min(lower_bound, sum(g.cost_per_hour for g in gpus)),
        assignment=tuple(assignment),
    )


def solve_spec(
    spec: AllocationSpec,
    rate: float | None = None,
    slice_factor: int | None = None,
    backend: Backend = DEFAULT_BACKEND,
) -> Plan:
    return solve(Problem.from_spec(spec, rate=rate, slice_factor=slice_factor), backend=backend)


def solve_per_slice(
    problem: Problem, backend: Backend = DEFAULT_BACKEND, time_limit: float | None = 60.0
) -> tuple[Status, float | None]:
    """The textbook form, one binary per (slice, GPU type): a reference for tests and benchmarks.

    Same optimum as `solve`, but S! symmetric copies of every solution make it slow to prove.
    Returns the status and the cost of the best plan found (None when there is none).
    """
    model = pulp.LpProblem("per_slice", pulp.LpMinimize)
    instances = [
        model.add_variable(f"n_{g}", gpu.min_replicas, gpu.max_replicas, cat=pulp.LpInteger)
        for g, gpu in enumerate(problem.gpus)
    ]
    loads: list[list[tuple[pulp.LpVariable, float]]] = [[] for _ in problem.gpus]
    for i, j in problem.demand_buckets():
        for s in range(problem.slice_factor):
            choices = []
            for g, gpu in enumerate(problem.gpus):
                if gpu.throughput[i][j] > 0:
                    chosen = model.add_variable(f"y_{g}_{i}_{j}_{s}", 0, 1, cat=pulp.LpInteger)
                    choices.append((chosen, 1.0))
                    loads[g].append((chosen, problem.slice_load(g, i, j)))
            model += pulp.LpAffineExpression(choices) == 1, f"slice_{i}_{j}_{s}"
    for g, terms in enumerate(loads):
        if terms:
            model += pulp.LpAffineExpression(terms) <= instances[g], f"capacity_{g}"
    model += pulp.LpAffineExpression(
        [(n, gpu.cost_per_hour) for n, gpu in zip(instances, problem.gpus, strict=True)]
    )
    unit = cost_unit([gpu.cost_per_hour for gpu in problem.gpus])
    model.solve(_backend(backend, time_limit, unit))
    if model.sol_status == pulp.LpSolutionOptimal:
        return "Optimal", float(pulp.value(model.objective))
    if model.sol_status == pulp.LpSolutionIntegerFeasible:
        return "Feasible", float(pulp.value(model.objective))
    return "Infeasible", None


def per_type_loads(problem: Problem, plan: Plan) -> Sequence[float]:
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
