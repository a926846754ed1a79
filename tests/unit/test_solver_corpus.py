"""The differential corpus: seeded random small instances, each solved by every method and compared
with the brute-force oracle; every plan passes the certificate check, every `Optimal` is the optimum,
every `Infeasible` has no plan at all."""

from __future__ import annotations

import math
import random

import pytest

from melange.plan import certify, solver
from melange.plan.problem import GpuOption, Problem
from melange.plan.result import METHODS, Method
from tests.unit.bruteforce import optimum

CORPUS_SIZE = 2000
CORPUS_SEED = 20261201
CHUNKS = 10
# The oracle enumerates assignments; instances with more than this many are drawn again.
ENUMERABLE = 20_000


def assignments(problem: Problem) -> int:
    """How many slice assignments the oracle may have to look at."""
    count = 1
    for i, j in problem.demand_buckets():
        able = sum(g.throughput[i][j] > 0 for g in problem.gpus)
        count *= math.comb(problem.slice_factor + able - 1, able - 1) if able else 1
    return count


def random_instance(rnd: random.Random) -> Problem:
    """An instance small enough for the oracle to enumerate (see `draw_instance`)."""
    while True:
        problem = draw_instance(rnd)
        if assignments(problem) <= ENUMERABLE:
            return problem


def draw_instance(rnd: random.Random) -> Problem:
    """2-4 types, up to 4x4 buckets, slice factor 1-4; zeros, minimums, caps and headroom; prices on
    a cent grid mostly, and off any grid sometimes (the exact stopping rule then has no grid)."""
    rows, cols = rnd.randint(1, 4), rnd.randint(1, 4)
    slices = rnd.randint(1, 4)
    types = rnd.randint(2, 4)
    density = rnd.choice([0.3, 0.6, 1.0])
    rates = tuple(
        tuple(
            round(rnd.uniform(0.1, 12), rnd.choice([0, 2])) if rnd.random() < density else 0.0
            for _ in range(cols)
        )
        for _ in range(rows)
    )
    on_grid = rnd.random() < 0.8
    gpus = []
    for g in range(types):
        zeros = rnd.choice([0.0, 0.2, 0.5])
        throughput = tuple(
            tuple(
                0.0 if rnd.random() < zeros else round(rnd.uniform(0.5, 20), rnd.choice([0, 2]))
                for _ in range(cols)
            )
            for _ in range(rows)
        )
        minimum = rnd.choice([0, 0, 0, 1, 2])
        gpus.append(
            GpuOption(
                name=f"gpu{g}",
                cost_per_hour=round(rnd.uniform(0.1, 5), 2) if on_grid else rnd.uniform(0.1, 5),
                throughput=throughput,
                min_replicas=minimum,
                max_replicas=rnd.choice([None, None, minimum + rnd.randint(0, 4)]),
            )
        )
    return Problem(
        input_edges=tuple(range(1, rows + 2)),
        output_edges=tuple(range(1, cols + 2)),
        rates=rates,
        gpus=tuple(gpus),
        slice_factor=slices,
        headroom=rnd.choice([0.0, 0.1, 0.25]),
    )


def issue_instance() -> Problem:
    """CBC 2.10.3 called 2.00/h optimal here; 1.50/h exists (gpu0=1, gpu1=1)."""
    return Problem(
        input_edges=(1, 2, 3, 4),
        output_edges=(1, 2, 3, 4),
        rates=((0.0, 0.0, 0.0), (0.0, 3.0, 0.0), (0.0, 2.0, 0.0)),
        gpus=(
            GpuOption("gpu0", 0.5, ((1, 1, 1), (1, 1, 1), (1, 3, 1)), max_replicas=2),
            GpuOption("gpu1", 1.0, ((0, 0, 0), (0, 5, 0), (0, 3, 0))),
            GpuOption("gpu2", 1.0, ((0, 0, 0), (0, 0, 0), (0, 0, 1))),
        ),
        slice_factor=2,
        headroom=0.25,
    )


def assert_agrees(problem: Problem, method: Method) -> None:
    expected = optimum(problem)
    plan = solver.solve(problem, method=method, time_limit=None)
    if expected is None:
        assert plan.status == "Infeasible", (plan.status, plan.cost_per_hour, problem)
        return
    assert plan.status == "Optimal", (plan.status, plan.reason, problem)
    assert certify.violations(problem, plan) == []
    assert plan.cost_per_hour == pytest.approx(expected, rel=1e-9, abs=1e-9), problem
    assert plan.lower_bound is not None
    assert plan.lower_bound <= expected + 1e-9


def corpus() -> list[Problem]:
    rnd = random.Random(CORPUS_SEED)
    return [random_instance(rnd) for _ in range(CORPUS_SIZE)]


@pytest.mark.parametrize("method", METHODS)
def test_issue_instance(method: Method) -> None:
    plan = solver.solve(issue_instance(), method=method)
    assert plan.status == "Optimal"
    assert plan.cost_per_hour == pytest.approx(1.5)
    assert plan.replicas() == {"gpu0": 1, "gpu1": 1, "gpu2": 0}
    assert_agrees(issue_instance(), method)


@pytest.mark.parametrize("chunk", range(CHUNKS))
@pytest.mark.parametrize("method", METHODS)
def test_corpus_matches_brute_force(method: Method, chunk: int) -> None:
    problems = corpus()
    size = len(problems) // CHUNKS
    for problem in problems[chunk * size : (chunk + 1) * size]:
        assert_agrees(problem, method)


def test_corpus_is_varied() -> None:
    """The corpus holds what it claims: infeasible instances, caps that bind, off-grid prices."""
    problems = corpus()
    verdicts = [optimum(p) for p in problems[:400]]
    assert sum(v is None for v in verdicts) >= 10
    assert sum(v is not None for v in verdicts) >= 300
    assert any(g.max_replicas is not None for p in problems for g in p.gpus)
    assert any(g.min_replicas > 0 for p in problems for g in p.gpus)
