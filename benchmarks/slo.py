"""SLO benchmark: does the cheapest mix meet the SLO once requests arrive one by one?

    python benchmarks/slo.py [--duration 600] [--seed 0] [--quick]

For the short-chat, long-document and mixed example workloads (examples/conversational.yaml,
document.yaml, mixed.yaml; shipped llama-3.1-8b estimates at a 120 ms TPOT SLO, headroom 0.2),
each at half, once and twice its example rate, it simulates (`melange.tools.simulate`):

- **mélange in**: the Mélange plan, routed by the plan's table on the input length alone (the
  output length unknown on arrival), then the least outstanding instance of the chosen type;
- **mélange io**: the same fleet, routed by input and output length (clients whose max_tokens is
  their real length): the plan's own per-bucket shares;
- **mélange rr**: the same fleet, round robin over every instance, whatever the request's size;
- **single**: the cheapest plan of one GPU type alone (the solver run on a spec with only that
  entry), least outstanding instance.

For each: cost per hour, the share of requests whose TPOT (decode time per token after the
first) is within the SLO, the share whose TPOT is within it and whose time to first token is
within 10 s (a queue that TPOT does not show), and the p99 time to first token. Every run uses
the same trace for a workload and rate (same seed).

The simulated engine is the one tests/e2e/test_simulate_http.py checks against real serving: the
same scheduler behind OpenAI-compatible streaming servers (tests/e2e/gpusim.py) and a real
`melange route`, at small scale; the run's last line says so.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from melange import api
from melange.cli.simulate import engines_for
from melange.plan import routing as route
from melange.plan import solver
from melange.plan.problem import Problem
from melange.plan.report import format_table
from melange.tools import simulate as sim

EXAMPLES = Path(__file__).parents[1] / "examples"
WORKLOADS = (
    ("short chat", "conversational.yaml"),
    ("long document", "document.yaml"),
    ("mixed", "mixed.yaml"),
)
RATE_FACTORS = (0.5, 1.0, 2.0)
TTFT_SLO = 10.0  # seconds: a bound on queueing, which TPOT alone does not always show


@dataclass(frozen=True)
class Row:
    workload: str
    rate: float
    config: str
    fleet: str
    cost: float
    tpot_ok: float
    both_ok: float
    ttft_p99: float


def _fleet(counts: dict[str, int]) -> str:
    return " ".join(f"{name}x{n}" for name, n in counts.items() if n)


def run(name: str, path: Path, factor: float, duration: float, seed: int) -> list[Row]:
    spec = api.load_bytes(path.read_bytes(), source=str(path)).spec
    rate = spec.workload.total_rate * factor
    engines = engines_for(spec, None)
    problem = Problem.from_spec(spec, rate=rate)
    plan = solver.solve(problem)
    table = route.derive(problem, plan)
    trace = sim.poisson_trace(
        spec.buckets.input_tokens, spec.buckets.output_tokens, problem.rates, duration, seed
    )
    rows = []

    def record(config: str, counts: dict[str, int], report: sim.Report) -> None:
        rows.append(
            Row(
                name,
                rate,
                config,
                _fleet(counts),
                report.total.cost_per_hour,
                report.total.within_slo,
                report.total.within_slo_and_ttft,
                report.total.ttft[-1],
            )
        )

    fleet = plan.replicas()
    for config, routing in (
        ("mélange in", "size-aware"),
        ("mélange io", "size-aware-output"),
        ("mélange rr", "round-robin"),
    ):
        report = sim.simulate(engines, fleet, trace, routing, route.chooser(table), seed, TTFT_SLO)  # type: ignore[arg-type]
        record(config, fleet, report)

    best: tuple[float, str] | None = None
    for gpu in spec.gpus:
        single = solver.solve(Problem.from_spec(spec.model_copy(update={"gpus": [gpu]}), rate=rate))
        cost = single.cost_per_hour if single.solved else None
        if cost is not None and (best is None or cost < best[0]):
            best = (cost, gpu.name)
    if best is not None:
        gpu = next(g for g in spec.gpus if g.name == best[1])
        single_spec = spec.model_copy(update={"gpus": [gpu]})
        single_problem = Problem.from_spec(single_spec, rate=rate)
        single_plan = solver.solve(single_problem)
        single_table = route.derive(single_problem, single_plan)
        engine = [e for e in engines if e.name == gpu.name]
        counts = single_plan.replicas()
        report = sim.simulate(
            engine, counts, trace, "size-aware", route.chooser(single_table), seed, TTFT_SLO
        )
        record("single", counts, report)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="120 s of traffic, one rate")
    args = parser.parse_args()
    duration = 120.0 if args.quick else args.duration
    factors = (1.0,) if args.quick else RATE_FACTORS
    began = time.perf_counter()
    rows: list[Row] = []
    for name, file in WORKLOADS:
        for factor in factors:
            rows.extend(run(name, EXAMPLES / file, factor, duration, args.seed))

    def share(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:.1%}"

    header = [
        "workload",
        "req/s",
        "config",
        "fleet",
        "cost/h",
        "TPOT ok",
        f"+TTFT<={TTFT_SLO:g}s ok",
        "TTFT p99 s",
    ]
    lines = format_table(
        header,
        [
            [
                r.workload,
                f"{r.rate:g}",
                r.config,
                r.fleet,
                f"{r.cost:.2f}",
                share(r.tpot_ok),
                share(r.both_ok),
                f"{r.ttft_p99:.2f}",
            ]
            for r in rows
        ],
    )
    print("\n".join(lines))
    print(
        f"\n{duration:g} s of Poisson traffic per run, seed {args.seed}; "
        f"{time.perf_counter() - began:.1f} s in all"
    )
    print(
        "cross-check: the simulated engine against real HTTP serving (the same scheduler behind "
        "streaming servers and melange route): pytest tests/e2e/test_simulate_http.py"
    )


if __name__ == "__main__":
    main()
