"""Solver benchmark: a seeded sweep at the CRD's sizes, each cell a whole `melange solve` command.

    python benchmarks/solver.py [--cap SECONDS] [--seeds N] [--quick] [--previous REV]

GPU types {4, 8, 12, 16} x buckets {10x10, 20x20, 32x32} x slice factor {16, 64}. For each cell it
times this tree's `melange solve` (process start, parsing and solving), and in the same run the
previous release's `melange solve` (its CBC default, from git REV) and the per-slice form (one binary
per slice and type, the published formulation, as the previous release builds it), each with a time
limit of --cap seconds. Prints a table with the ratios of their times to this tree's, and a summary
against the goal: every cell proven optimal, median under 1 s, none over 2 s.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TYPES = (4, 8, 12, 16)
BUCKETS = (10, 20, 32)
SLICES = (16, 64)
PREVIOUS = "889063b"  # the last release before the certified decomposition
PER_SLICE_LIMIT = 150_000  # binaries; a larger per-slice model takes minutes just to build


def manifest(types: int, buckets: int, slices: int, seed: int) -> dict[str, object]:
    """GPU types with a speed and a price; throughput falls with input and output length at a
    per-type pace, so that no type is best everywhere; 30% of the buckets without traffic."""
    rnd = random.Random(seed)
    edges = [1 + round(k * 16384 / buckets) for k in range(buckets + 1)]
    rates = [
        [round(rnd.expovariate(1.0), 3) if rnd.random() < 0.7 else 0.0 for _ in range(buckets)]
        for _ in range(buckets)
    ]
    gpus = []
    for g in range(types):
        speed = rnd.uniform(0.5, 8)
        fall_in, fall_out = rnd.uniform(0.3, 1.2), rnd.uniform(0.3, 1.2)
        throughput = [
            [
                round(
                    speed
                    * 40
                    / (1 + i * fall_in * 10 / buckets)
                    / (1 + j * fall_out * 10 / buckets),
                    3,
                )
                for j in range(buckets)
            ]
            for i in range(buckets)
        ]
        cost = round(speed ** rnd.uniform(0.6, 1.1), 2)
        gpus.append({"name": f"gpu{g}", "costPerHour": cost, "throughput": throughput})
    return {
        "buckets": {"inputTokens": edges, "outputTokens": edges},
        "workload": {"distribution": rates, "totalRate": round(sum(map(sum, rates)), 3)},
        "sliceFactor": slices,
        "gpus": gpus,
    }


def run(command: list[str], cap: float) -> tuple[float, str, float | None]:
    """Wall time, status and cost of one command printing a plan as JSON (or the last line)."""
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, check=False, capture_output=True, text=True, timeout=cap + 30
        )
    except subprocess.TimeoutExpired:
        return time.perf_counter() - started, "killed", None
    elapsed = time.perf_counter() - started
    try:
        data = json.loads(
            done.stdout.strip().splitlines()[-1] if done.stdout.startswith("[") else done.stdout
        )
    except (json.JSONDecodeError, IndexError):
        return elapsed, f"error {done.returncode}: {done.stderr.strip()[-80:]}", None
    if isinstance(data, list):
        return elapsed, str(data[0]), data[1]
    return elapsed, str(data["status"]), data.get("costPerHour")


PER_SLICE = """
import json, sys, yaml
from melange import api
from melange import solver
spec = api.validate_spec(json.load(open(sys.argv[1])))
status, cost = solver.solve_per_slice(solver.Problem.from_spec(spec), time_limit=float(sys.argv[2]))
print(json.dumps([status, cost]))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--cap", type=float, default=20.0, help="time limit per solve, seconds")
    parser.add_argument("--seeds", type=int, default=1, help="instances per cell")
    parser.add_argument("--quick", action="store_true", help="only 4 and 16 types, 10x10 and 32x32")
    parser.add_argument("--previous", default=PREVIOUS, help="git revision of the previous release")
    parser.add_argument("--only-current", action="store_true", help="skip the two baselines")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="melange-bench-"))
    old = workdir / "previous"
    if not args.only_current:
        old.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.previous, "operator"],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    current = [sys.executable, "-c", "from melange.cli import main; main()"]
    previous = [
        sys.executable,
        "-c",
        f"import sys; sys.path.insert(0, {str(old / 'operator')!r}); from melange.cli import main; main()",
    ]
    per_slice = [
        sys.executable,
        "-c",
        f"import sys; sys.path.insert(0, {str(old / 'operator')!r})\n{PER_SLICE}",
    ]
    types_axis = (4, 16) if args.quick else TYPES
    buckets_axis = (10, 32) if args.quick else BUCKETS
    header = f"{'cell':<18}{'now s':>7} {'status':<9}{'cost':>9} | {'prev s':>7} {'status':<9}{'ratio':>6} | {'slice s':>7} {'status':<9}{'ratio':>6}"
    print(header)
    print("-" * len(header))
    times: list[float] = []
    proven = 0
    misses: list[str] = []
    for types in types_axis:
        for buckets in buckets_axis:
            for slices in SLICES:
                for seed in range(args.seeds):
                    name = f"{types}x{buckets}x{buckets} S={slices}"
                    path = workdir / f"{types}-{buckets}-{slices}-{seed}.json"
                    path.write_text(
                        json.dumps(
                            manifest(types, buckets, slices, 1000 * types + 10 * buckets + seed)
                        )
                    )
                    cap = ["--time-limit", str(args.cap)]
                    t_now, s_now, c_now = run(
                        [*current, "solve", str(path), "-o", "json", *cap], args.cap
                    )
                    times.append(t_now)
                    proven += s_now == "Optimal"
                    if s_now != "Optimal" or t_now > 2.0:
                        misses.append(f"{name}: {s_now} in {t_now:.2f} s")
                    row = f"{name:<18}{t_now:>7.2f} {s_now:<9}{c_now or 0:>9.2f} | "
                    if args.only_current:
                        print(row)
                        continue
                    t_old, s_old, _ = run(
                        [*previous, "solve", str(path), "-o", "json", *cap], args.cap
                    )
                    row += f"{t_old:>7.2f} {s_old:<9}{t_old / t_now:>6.1f} | "
                    if types * buckets * buckets * slices * 0.7 > PER_SLICE_LIMIT:
                        row += f"{'-':>7} {'too large':<9}{'-':>6}"
                    else:
                        t_ps, s_ps, _ = run([*per_slice, str(path), str(args.cap)], args.cap)
                        row += f"{t_ps:>7.2f} {s_ps:<9}{t_ps / t_now:>6.1f}"
                    print(row, flush=True)
    print()
    print(
        f"{proven}/{len(times)} proven optimal; median {statistics.median(times):.2f} s, "
        f"max {max(times):.2f} s (goal: all proven, median < 1 s, none > 2 s)"
    )
    for miss in misses:
        print(f"  misses the goal: {miss}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
