"""The spec's numeric bounds make every computation of the plan finite, and a positive rate a plan
for that rate: properties over random valid specs that reach the extremes the bounds allow
(denormal cells and throughputs, the largest cells, rates, costs and slice factors)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from melange import api
from melange.plan import certify, solver
from melange.plan.problem import LOAD_EPSILON, GpuOption, Problem

TINY = [5e-324, 1e-320, 2.2250738585072014e-308, 1e-300]
CELLS = st.one_of(
    st.sampled_from([0.0, *TINY, 1e-6, 0.123456789012345678, 1.0, 1e6, api.MAX_CELL]),
    st.floats(0, api.MAX_CELL),
)
RATES = st.one_of(
    st.sampled_from([api.MIN_POSITIVE_RATE, 1e-3, 1.0, 34.0, 1e6, api.MAX_RATE]),
    st.floats(api.MIN_POSITIVE_RATE, api.MAX_RATE),
)
THROUGHPUTS = st.one_of(
    st.sampled_from([0.0, *TINY, 1e-6, 0.5, 20.0, 1e6, api.MAX_RATE]),
    st.floats(0, api.MAX_RATE),
)
COSTS = st.sampled_from([5e-324, 1e-9, 0.01, 0.7, 3.67, 1e6, api.MAX_COST_PER_HOUR])
SETTINGS = settings(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@st.composite
def specs(draw: st.DrawFn, max_buckets: int, max_gpus: int) -> api.AllocationSpec:
    """A valid spec (the model accepts it) with numbers anywhere within their bounds."""
    rows = draw(st.integers(1, max_buckets))
    cols = draw(st.integers(1, max_buckets))

    def matrix(values: st.SearchStrategy[float]) -> list[list[float]]:
        return draw(
            st.lists(st.lists(values, min_size=cols, max_size=cols), min_size=rows, max_size=rows)
        )

    distribution = matrix(CELLS)
    if not any(v > 0 for row in distribution for v in row):
        distribution[draw(st.integers(0, rows - 1))][0] = draw(CELLS.filter(lambda v: v > 0))
    gpus: list[dict[str, Any]] = []
    for k in range(draw(st.integers(1, max_gpus))):
        gpu: dict[str, Any] = {
            "name": f"g{k}",
            "costPerHour": draw(COSTS),
            "throughput": matrix(THROUGHPUTS),
        }
        low = draw(st.sampled_from([0, 0, 0, 1, 3]))
        high = draw(st.sampled_from([None, None, low, low + 2, api.MAX_REPLICAS]))
        gpu["minReplicas"] = low
        if high is not None:
            gpu["maxReplicas"] = high
        gpus.append(gpu)
    return api.validate_spec(
        {
            "buckets": {
                "inputTokens": list(range(1, rows + 2)),
                "outputTokens": list(range(1, cols + 2)),
            },
            "workload": {"distribution": distribution, "totalRate": draw(RATES)},
            "sliceFactor": draw(st.sampled_from([1, 2, 8, 64, api.MAX_SLICE_FACTOR])),
            "headroom": draw(st.sampled_from([0.0, 0.1, 10.0])),
            "gpus": gpus,
        }
    )


@given(spec=specs(max_buckets=api.MAX_BUCKETS, max_gpus=api.MAX_GPUS))
@SETTINGS
def test_a_positive_rate_is_never_planned_as_none(spec: api.AllocationSpec) -> None:
    """A positive totalRate over a distribution with a positive cell gives buckets with traffic,
    however extreme the cells; every rate and every load the solver will form is finite."""
    problem = Problem.from_spec(spec)
    assert problem.total_rate > 0
    assert math.isclose(problem.total_rate, spec.workload.total_rate, rel_tol=1e-9)
    assert problem.demand_buckets()
    for g, gpu in enumerate(problem.gpus):
        for i, j in problem.demand_buckets():
            if gpu.throughput[i][j] > 0:
                load = problem.slice_load(g, i, j)
                assert math.isfinite(load)
                assert load <= api.MAX_REPLICAS * (1 + 1e-12)


def least_load(problem: Problem) -> float:
    """The fewest instances' worth of traffic any plan carries: each bucket on its fastest type."""
    total = 0.0
    for i, j in problem.demand_buckets():
        fastest = max(gpu.throughput[i][j] for gpu in problem.gpus)
        total += problem.rates[i][j] / fastest * (1.0 + problem.headroom)
    return total


def _gpu(name: str, throughput: list[list[float]], **extra: Any) -> dict[str, Any]:
    return {"name": name, "costPerHour": 5e-324, "throughput": throughput, **extra}


# A load of 2e-6 instances on a type capped at 0 replicas, that type the only one serving its
# bucket: the greedy start counted it as fitting under the cap (load < cap + 1), the certificate
# rejected the plan, and the answer was Unsolved instead of Infeasible.
GREEDY_OVER_A_ZERO_CAP = api.validate_spec(
    {
        "buckets": {"inputTokens": [1, 2, 3, 4, 5], "outputTokens": [1, 2, 3, 4, 5]},
        "workload": {
            "distribution": [[1, 0, 0, 0], [1e12, 0, 0, 0], [0, 0, 0, 15231650], [0, 0, 0, 65]],
            "totalRate": 1e6,
        },
        "sliceFactor": 1,
        "gpus": [
            _gpu("g0", [[0.5, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1e9], [0, 0, 0, 0]], maxReplicas=0),
            _gpu("g1", [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0.5], [0, 0, 0, 0]]),
            _gpu("g2", [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]),
            _gpu("g3", [[0, 0, 0, 0], [1e6, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]),
        ],
    }
)


@given(spec=specs(max_buckets=4, max_gpus=4))
@example(spec=GREEDY_OVER_A_ZERO_CAP)
@settings(SETTINGS, max_examples=300)
def test_a_positive_rate_gets_instances_or_a_reason(spec: api.AllocationSpec) -> None:
    """The solver's answer to a positive rate: a certified plan, or Infeasible with its reason.

    A plan's replicas are all 0 only when its whole load fits in floating-point noise: the
    certificate lets each type carry up to LOAD_EPSILON of an instance with no replica, so a plan
    of no instances carries at most (types x LOAD_EPSILON); any workload heavier than that, on the
    fastest types, gets at least one instance. Without caps, a workload every bucket of which some
    type can serve always gets a plan.
    """
    problem = Problem.from_spec(spec)
    plan = solver.solve(problem, time_limit=30)
    event(plan.status)
    assert plan.status in {"Optimal", "Feasible", "Infeasible"}, plan.reason
    if not plan.solved:
        assert plan.reason
        capped = any(gpu.max_replicas is not None for gpu in problem.gpus)
        assert problem.unservable() or capped, plan.reason
        return
    assert certify.violations(problem, plan) == []
    assert plan.cost_per_hour is not None
    assert math.isfinite(plan.cost_per_hour)
    assert plan.total_rate > 0
    if least_load(problem) > 2 * len(problem.gpus) * LOAD_EPSILON:
        assert sum(g.replicas for g in plan.gpus) >= 1


@pytest.mark.parametrize(
    ("rate", "message"),
    [
        (math.inf, "not a number within"),
        (-1.0, "not a number within"),
        (api.MAX_RATE * 2, "not a number within"),
        (5e-324, "too small to share"),
    ],
)
def test_an_observed_rate_outside_the_bounds_is_refused(rate: float, message: str) -> None:
    """An observed rate is not checked by the API server: the problem refuses what the spec's
    bounds would (a ValueError naming it, which the operator reports), never an overflow."""
    spec = api.validate_spec(
        {
            "buckets": {"inputTokens": [1, 2, 3, 4], "outputTokens": [1, 2]},
            "workload": {"distribution": [[1], [1], [1]], "totalRate": 1},
            "gpus": [{"name": "a", "costPerHour": 1, "throughput": [[1], [1], [1]]}],
        }
    )
    with pytest.raises(ValueError, match=message):
        Problem.from_spec(spec, rate=rate)


def test_a_problem_refuses_numbers_beyond_the_bounds() -> None:
    gpu = GpuOption("a", 1.0, ((1e308,),))
    with pytest.raises(ValueError, match="throughput"):
        Problem((1, 2), (1, 2), ((1.0,),), (gpu,))
    with pytest.raises(ValueError, match="rate"):
        Problem((1, 2), (1, 2), ((math.nan,),), (GpuOption("a", 1.0, ((1.0,),)),))
