"""The solver: properties over random instances (against the brute-force oracle), order independence,
time limits, and the edge cases."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import hypothesis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from melange.plan import certify, report, solver
from melange.plan.problem import GpuOption, Problem
from melange.plan.result import METHODS
from tests.unit.bruteforce import MAX_ASSIGNMENTS, assignments, optimum
from tests.unit.test_solver_corpus import issue_instance

TOLERANCE = 1e-6


@st.composite
def problems(draw: st.DrawFn, with_minimums: bool = True) -> Problem:
    rows = draw(st.integers(1, 3))
    cols = draw(st.integers(1, 3))
    count = draw(st.integers(1, 4))
    rate = st.floats(0, 20, allow_nan=False).map(lambda v: round(v, 3))
    rates = tuple(tuple(draw(rate) for _ in range(cols)) for _ in range(rows))
    gpus = []
    for g in range(count):
        # The first type serves everything, so the instance is feasible unless capped.
        low = 0.5 if g == 0 else 0.0
        value = (
            st.one_of(st.just(0.0), st.floats(low, 50).map(lambda v: round(v, 2)))
            if g
            else (st.floats(low, 50).map(lambda v: round(v, 2)))
        )
        throughput = tuple(tuple(max(draw(value), low) for _ in range(cols)) for _ in range(rows))
        minimum = draw(st.integers(0, 2)) if with_minimums else 0
        gpus.append(
            GpuOption(
                name=f"gpu{g}",
                cost_per_hour=draw(st.floats(0.1, 10).map(lambda v: round(v, 2))),
                throughput=throughput,
                min_replicas=minimum,
                max_replicas=draw(st.one_of(st.none(), st.integers(minimum, minimum + 40))),
            )
        )
    problem = Problem(
        input_edges=tuple(range(1, rows + 2)),
        output_edges=tuple(range(1, cols + 2)),
        rates=rates,
        gpus=tuple(gpus),
        slice_factor=draw(st.integers(1, 6)),
        headroom=draw(st.sampled_from([0.0, 0.1, 0.25])),
    )
    # Small enough for the oracle: fewer slices where every bucket has many types to choose from.
    while assignments(problem) > MAX_ASSIGNMENTS and problem.slice_factor > 1:
        problem = replace(problem, slice_factor=problem.slice_factor - 1)
    return problem


PROPERTY_SETTINGS = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(problems())
def test_plan_covers_demand_within_bounds(problem: Problem) -> None:
    plan = solver.solve(problem)
    if not plan.solved:
        assert plan.reason
        assert optimum(problem) is None, "the oracle found a plan"
        return
    assert plan.cost_per_hour is not None
    assert plan.lower_bound is not None
    by_bucket = {(b.input_tokens[0], b.output_tokens[0]): b for b in plan.assignment}
    for i, j in problem.demand_buckets():
        shares = by_bucket[problem.input_edges[i], problem.output_edges[j]].shares
        assert math.isclose(sum(s.fraction for s in shares), 1.0)
        for share in shares:
            slices = share.fraction * problem.slice_factor
            assert math.isclose(slices, round(slices)), "slices are assigned whole"
    loads = solver.per_type_loads(problem, plan)
    for gpu, result, load in zip(problem.gpus, plan.gpus, loads, strict=True):
        assert load * (1 + problem.headroom) <= result.replicas + TOLERANCE
        assert result.replicas >= gpu.min_replicas
        if gpu.max_replicas is not None:
            assert result.replicas <= gpu.max_replicas
    assert plan.cost_per_hour >= plan.lower_bound - TOLERANCE
    idle_minimums = sum(g.cost_per_hour * g.min_replicas for g in problem.gpus)
    for baseline in plan.baselines:
        if baseline.cost_per_hour is not None:
            # The single-type plan plus the minimums of the others is a feasible plan.
            assert plan.cost_per_hour <= baseline.cost_per_hour + idle_minimums + TOLERANCE


@PROPERTY_SETTINGS
@given(problems(with_minimums=False))
def test_never_costlier_than_best_single_type(problem: Problem) -> None:
    plan = solver.solve(problem)
    best = plan.best_baseline
    if plan.solved and best is not None and best.cost_per_hour is not None:
        assert plan.cost_per_hour is not None
        assert plan.cost_per_hour <= best.cost_per_hour + TOLERANCE
        assert plan.saving is not None
        assert plan.saving >= -TOLERANCE


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
@hypothesis.example(issue_instance())  # CBC 2.10.3 called 2.00/h optimal here; 1.50/h exists
def test_every_method_matches_the_oracle(problem: Problem) -> None:
    reference = optimum(problem)
    for method in METHODS:
        plan = solver.solve(problem, method=method, time_limit=None)
        if reference is None:
            assert plan.status == "Infeasible"
        else:
            assert plan.status == "Optimal"
            assert certify.violations(problem, plan) == []
            assert plan.cost_per_hour == pytest.approx(reference, abs=TOLERANCE)


def shuffled(problem: Problem, rnd: random.Random) -> Problem:
    """The same problem with its GPU types listed in another order and its buckets permuted (the
    rows and columns of every matrix moved together, the edges kept)."""
    rows, cols = list(range(len(problem.rates))), list(range(len(problem.rates[0])))
    rnd.shuffle(rows)
    rnd.shuffle(cols)

    def permute(matrix: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
        return tuple(tuple(matrix[i][j] for j in cols) for i in rows)

    gpus = [replace(g, throughput=permute(g.throughput)) for g in problem.gpus]
    rnd.shuffle(gpus)
    return replace(problem, rates=permute(problem.rates), gpus=tuple(gpus))


@pytest.mark.parametrize("seed", range(20))
def test_permuted_problem_costs_the_same(seed: int) -> None:
    from tests.unit.test_solver_corpus import draw_instance

    rnd = random.Random(seed)
    problem = draw_instance(rnd)
    plan = solver.solve(problem)
    for _ in range(3):
        other = solver.solve(shuffled(problem, rnd))
        assert other.status == plan.status
        if plan.solved:
            assert other.cost_per_hour == pytest.approx(plan.cost_per_hour, abs=TOLERANCE)


def test_time_limit_too_short_for_search_still_gives_a_checked_plan() -> None:
    problem = example()
    plan = solver.solve(problem, time_limit=1e-9)
    assert plan.status == "Feasible"
    assert plan.reason == "time limit reached before optimality was proven"
    assert certify.violations(problem, plan) == []
    assert plan.lower_bound is not None
    assert plan.cost_per_hour is not None
    assert plan.lower_bound <= plan.cost_per_hour


def test_time_limit_counts_from_the_callers_start() -> None:
    """A limit that ran out before the solve began (while parsing) leaves no time to search."""
    import time

    plan = solver.solve(example(), time_limit=5.0, started=time.monotonic() - 10.0)
    assert plan.status == "Feasible"


def test_certificate_check_rejects_a_broken_plan() -> None:
    problem = example()
    plan = solver.solve(problem)
    assert certify.violations(problem, plan) == []
    short = replace(
        plan, gpus=tuple(replace(g, replicas=max(0, g.replicas - 1)) for g in plan.gpus)
    )
    assert any("carry a load that needs" in v for v in certify.violations(problem, short))
    dropped = replace(plan, assignment=plan.assignment[1:])
    assert any("has traffic but no assignment" in v for v in certify.violations(problem, dropped))
    priced = replace(plan, cost_per_hour=(plan.cost_per_hour or 0) - 0.01)
    assert any("differs from its replicas'" in v for v in certify.violations(problem, priced))


def example() -> Problem:
    return Problem(
        input_edges=(1, 100, 1000, 16000),
        output_edges=(1, 100, 1000),
        rates=((16.0, 6.0), (6.0, 3.0), (2.0, 1.0)),
        gpus=(
            GpuOption("L4", 0.8, ((20, 6), (8, 2), (1, 0))),
            GpuOption("A100", 3.7, ((60, 25), (40, 12), (10, 4))),
        ),
        slice_factor=8,
    )


def test_deterministic_byte_for_byte() -> None:
    first = json.dumps(report.plan_to_dict(solver.solve(example()), include_timing=False))
    for _ in range(3):
        again = json.dumps(report.plan_to_dict(solver.solve(example()), include_timing=False))
        assert again == first


def test_mix_beats_single_types_on_mixed_workload() -> None:
    plan = solver.solve(example())
    assert plan.status == "Optimal"
    # A100 alone needs 1.36 instances (so 2, 7.40/h); one A100 with two L4s taking the short
    # buckets is cheaper (5.30/h), and one L4 is too few.
    assert plan.replicas() == {"L4": 2, "A100": 1}
    assert plan.cost_per_hour == pytest.approx(5.3)
    assert optimum(example()) == pytest.approx(5.3)
    assert plan.best_baseline is not None
    assert plan.best_baseline.gpu == "A100"
    assert plan.saving == pytest.approx(1 - 5.3 / 7.4)


def test_zero_rate_gives_minimums() -> None:
    problem = example()
    idle = replace(
        problem,
        rates=tuple(tuple(0.0 for _ in row) for row in problem.rates),
        gpus=(
            GpuOption("L4", 0.8, problem.gpus[0].throughput, min_replicas=2),
            GpuOption("A100", 3.7, problem.gpus[1].throughput, min_replicas=1, max_replicas=5),
        ),
    )
    plan = solver.solve(idle)
    assert plan.status == "Optimal"
    assert plan.replicas() == {"L4": 2, "A100": 1}
    assert plan.cost_per_hour == pytest.approx(2 * 0.8 + 3.7)
    assert plan.assignment == ()


def test_unservable_bucket_is_named_by_token_ranges() -> None:
    problem = example()
    only_l4 = replace(problem, gpus=(problem.gpus[0],))
    plan = solver.solve(only_l4)
    assert plan.status == "Infeasible"
    assert plan.reason == "no GPU type can serve input 1000-16000, output 100-1000 tokens (1 req/s)"
    assert plan.gpus == ()


def test_capped_type_is_named() -> None:
    problem = example()
    capped = replace(problem, gpus=(problem.gpus[0], replace(problem.gpus[1], max_replicas=0)))
    plan = solver.solve(capped)
    assert plan.status == "Infeasible"
    assert plan.reason == (
        "the demand of 34 req/s does not fit within maxReplicas of A100 (maxReplicas 0)"
    )


def test_headroom_buys_spare_capacity() -> None:
    problem = example()
    roomy = replace(problem, headroom=0.5)
    plain, padded = solver.solve(problem), solver.solve(roomy)
    assert padded.cost_per_hour is not None
    assert plain.cost_per_hour is not None
    assert padded.cost_per_hour > plain.cost_per_hour
    for gpu in padded.gpus:
        assert gpu.utilization <= 1 / 1.5 + TOLERANCE
