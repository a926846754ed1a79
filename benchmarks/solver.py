"""Solver benchmark: the counted form (HiGHS, CBC) against the per-slice form, on seeded instances.

    python benchmarks/solver.py [--cap SECONDS] [--quick]

Prints, per instance, the time and cost of each, and the ratio of each time to the counted form on
HiGHS measured in the same process. Also times a whole `melange solve` command on the largest instance.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import yaml

from melange import perfmodel, solver
from melange.solver import GpuOption, Problem

P = ParamSpec("P")
R = TypeVar("R")

SIZES = [  # (GPU types, buckets per axis, slice factor)
    (2, 5, 8),
    (4, 10, 16),
    (8, 10, 32),
    (8, 20, 32),
    (16, 20, 64),
]


def random_problem(types: int, buckets: int, slices: int, seed: int) -> Problem:
    """GPU types with a speed and a price; throughput falls with input and output length at a
    per-type pace, so that no type is best everywhere (the situation the method is for)."""
    rnd = random.Random(seed)
    edges = tuple([1] + [2**k for k in range(1, buckets + 1)])
    rates = tuple(
        tuple(round(rnd.expovariate(1.0), 3) if rnd.random() < 0.7 else 0.0 for _ in range(buckets))
        for _ in range(buckets)
    )
    gpus = []
    for g in range(types):
        speed = rnd.uniform(0.5, 8)
        fall_in, fall_out = rnd.uniform(0.3, 1.2), rnd.uniform(0.3, 1.2)
        throughput = tuple(
            tuple(
                round(speed * 40 / (1 + i * fall_in) / (1 + j * fall_out), 3)
                for j in range(buckets)
            )
            for i in range(buckets)
        )
        gpus.append(GpuOption(f"gpu{g}", round(speed ** rnd.uniform(0.6, 1.1), 2), throughput))
    return Problem(edges, edges, rates, tuple(gpus), slice_factor=slices)


def profile_problem(rate: float, slices: int) -> Problem:
    """The ten shipped profiles (five GPU types at two SLOs) on an even workload."""
    gpus = []
    for name, profile in perfmodel.generate_shipped_profiles().items():
        gpus.append(
            GpuOption(name, profile["costPerHour"], tuple(map(tuple, profile["throughput"])))
        )
    rows, cols = len(perfmodel.DEFAULT_INPUT_EDGES) - 1, len(perfmodel.DEFAULT_OUTPUT_EDGES) - 1
    rates = tuple(tuple(rate / (rows * cols) for _ in range(cols)) for _ in range(rows))
    return Problem(
        perfmodel.DEFAULT_INPUT_EDGES, perfmodel.DEFAULT_OUTPUT_EDGES, rates, tuple(gpus), slices
    )


def timed(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> tuple[float, R]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


def fmt_cost(status: str, cost: float | None) -> str:
    if cost is None:
        return status
    return f"{cost:.2f}" + ("" if status == "Optimal" else "*")


def as_manifest(problem: Problem) -> dict[str, object]:
    return {
        "buckets": {
            "inputTokens": list(problem.input_edges),
            "outputTokens": list(problem.output_edges),
        },
        "workload": {
            "distribution": [list(r) for r in problem.rates],
            "totalRate": problem.total_rate,
        },
        "sliceFactor": problem.slice_factor,
        "gpus": [
            {
                "name": g.name,
                "costPerHour": g.cost_per_hour,
                "throughput": [list(r) for r in g.throughput],
            }
            for g in problem.gpus
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=float, default=20.0, help="time limit per solve, seconds")
    parser.add_argument("--quick", action="store_true", help="only the three smallest sizes")
    parser.add_argument("--seeds", type=int, default=3, help="random instances per size")
    args = parser.parse_args()
    sizes = SIZES[:3] if args.quick else SIZES
    instances = [
        (f"random {t}x{b}x{b} S={s} #{k}", random_problem(t, b, s, seed=t * 1000 + b * 10 + k))
        for t, b, s in sizes
        for k in range(args.seeds)
    ]
    instances.insert(0, ("profiles 10x8x6 S=64", profile_problem(30.0, 64)))
    solver.solve(instances[0][1])  # warm-up: imports, the HiGHS library
    ratios: list[float] = []
    header = f"{'instance':<30}{'highs s':>9}{'cost':>9}{'cbc s':>9}{'x':>7}{'cost':>9}{'slice s':>9}{'x':>7}{'cost':>9}  same"
    print(header)
    print("-" * len(header))
    for name, problem in instances:
        t_highs, highs = timed(solver.solve, problem, "highs", args.cap)
        t_cbc, cbc = timed(solver.solve, problem, "cbc", args.cap)
        t_slice, (slice_status, slice_cost) = timed(
            solver.solve_per_slice, problem, "highs", args.cap
        )
        assert isinstance(highs, solver.Plan)
        assert isinstance(cbc, solver.Plan)
        costs = [c for c in (highs.cost_per_hour, cbc.cost_per_hour, slice_cost) if c is not None]
        all_proven = highs.status == cbc.status == slice_status == "Optimal"
        same = (
            "yes"
            if all_proven and max(costs) - min(costs) < 1e-6
            else "n/a (cap)"
            if not all_proven
            else "NO"
        )
        print(
            f"{name:<30}{t_highs:>9.3f}{fmt_cost(highs.status, highs.cost_per_hour):>9}"
            f"{t_cbc:>9.3f}{t_cbc / t_highs:>7.1f}{fmt_cost(cbc.status, cbc.cost_per_hour):>9}"
            f"{t_slice:>9.3f}{t_slice / t_highs:>7.1f}{fmt_cost(slice_status, slice_cost):>9}  {same}"
        )
        ratios.append(t_cbc / t_highs)
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print("* = best plan found within the cap, optimality not proven; x = time / highs time")
    print(f"cbc / highs time, geometric mean over {len(ratios)} instances: {geomean:.2f}")
    melange = shutil.which("melange", path=str(Path(sys.executable).parent))
    if melange and not args.quick:
        name, problem = instances[-1]
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
            yaml.safe_dump(as_manifest(problem), handle)
        started = time.perf_counter()
        done = subprocess.run(
            [melange, "solve", handle.name], capture_output=True, text=True, check=False
        )
        print(
            f"whole `melange solve` on {name}: {time.perf_counter() - started:.2f} s (exit {done.returncode})"
        )
        Path(handle.name).unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
