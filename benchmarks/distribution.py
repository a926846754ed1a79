"""Distribution benchmark: what following the live request sizes adds to each poll.

    python benchmarks/distribution.py [--repeat 20]

At every poll of an allocation with `workload.fromPrometheus`, the operator parses two histogram
answers, re-bins them and fits the matrix (`melange.signals.distribution.observe`). This times that against
a baseline measured in the same process: one solve of the same allocation, which a drift causes
anyway. Sizes: the examples' 8 x 6 buckets with 5 GPU types, and 16 x 16 with 8 (random
throughputs make harder instances than real profiles do). The histograms have vLLM's 1-2-5 bounds
up to 500k tokens and a log-normal shape.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1]))

from melange import api
from melange.plan import solver
from melange.signals import distribution

BOUNDS = [m * 10**e for e in range(6) for m in (1, 2, 5)]  # 1 .. 500000, as vLLM's 1-2-5 series


def edges(buckets: int, largest: int) -> list[int]:
    return sorted({1, *np.geomspace(2, largest, buckets).astype(int).tolist()})[: buckets + 1]


def histogram_answer(median: float, sigma: float, requests: int) -> str:
    """A `sum by (le)` answer for a log-normal length distribution."""
    cdf = [
        0.5 * (1 + math.erf((math.log(b) - math.log(median)) / (sigma * math.sqrt(2))))
        for b in BOUNDS
    ]
    result = [
        {"metric": {"le": f"{b:g}"}, "value": [0, str(requests * c)]}
        for b, c in zip(BOUNDS, cdf, strict=True)
    ]
    result.append({"metric": {"le": "+Inf"}, "value": [0, str(requests)]})
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}})


def spec(rows: int, cols: int, gpus: int, seed: int) -> api.AllocationSpec:
    rng = np.random.default_rng(seed)
    edges_in, edges_out = edges(rows, 32000), edges(cols, 4000)
    rows, cols = len(edges_in) - 1, len(edges_out) - 1
    return api.validate_spec(
        {
            "buckets": {"inputTokens": edges_in, "outputTokens": edges_out},
            "workload": {
                "distribution": rng.uniform(0.1, 1, (rows, cols)).round(4).tolist(),
                "totalRate": 20,
            },
            "gpus": [
                {
                    "name": f"gpu-{g}",
                    "costPerHour": round(float(rng.uniform(0.5, 8)), 2),
                    "throughput": rng.uniform(0.5, 40, (rows, cols)).round(3).tolist(),
                }
                for g in range(gpus)
            ],
        }
    )


def median_seconds(action: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    prompt_body = histogram_answer(600, 1.2, 50_000)
    generation_body = histogram_answer(150, 1.0, 50_000)
    print(f"{'instance':<16}{'observe (ms)':>14}{'solve (ms)':>12}{'observe/solve':>15}")
    for rows, cols, gpus in ((8, 6, 5), (16, 16, 8)):
        allocation = spec(rows, cols, gpus, seed=rows)

        def observe(allocation: api.AllocationSpec = allocation) -> None:
            prompt = distribution.parse_histogram_response(200, prompt_body, "prompt-tokens")
            generation = distribution.parse_histogram_response(200, generation_body, "generation")
            distribution.observe(
                allocation.workload.distribution,
                allocation.buckets.input_tokens,
                allocation.buckets.output_tokens,
                prompt,
                generation,
            )

        def solve(allocation: api.AllocationSpec = allocation) -> None:
            solver.solve_spec(allocation)

        fitted = median_seconds(observe, args.repeat)
        solved = median_seconds(solve, max(3, args.repeat // 5))
        name = f"{rows}x{cols}, {gpus} types"
        print(f"{name:<16}{fitted * 1e3:>14.2f}{solved * 1e3:>12.1f}{fitted / solved:>15.4f}")


if __name__ == "__main__":
    main()
