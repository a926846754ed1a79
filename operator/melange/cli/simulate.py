"""`melange simulate`: replay traffic through a plan's fleet, request by request, and report the
latencies and the SLO attainment its clients would see (`melange.tools.simulate`).

The solver, the routing table and the simulation load when the command runs, not for its help.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from melange import api
from melange.cli.util import (
    EXIT_INFEASIBLE,
    EXIT_INVALID,
    dump,
    fail,
    read_allocation,
    table_format,
)

if TYPE_CHECKING:
    from melange.tools import simulate as sim

MAX_DURATION = 7 * 86400.0  # a week of simulated traffic
MAX_REQUESTS = 20_000_000  # the most requests one run replays (memory: ~100 bytes each)


def parse_gpus(value: str | None) -> dict[str, int] | None:
    """`L4=2,L40S=3` -> {"L4": 2, "L40S": 3}; a malformed list exits 2 with one line."""
    if value is None:
        return None
    counts: dict[str, int] = {}
    for part in value.split(","):
        name, sep, number = part.strip().partition("=")
        if not sep or not name or not number.strip().isdigit():
            fail(
                [f"--gpus: must be TYPE=N pairs separated by commas, got {part.strip()!r}"],
                EXIT_INVALID,
            )
        if name in counts:
            fail([f"--gpus: {name} is given twice"], EXIT_INVALID)
        count = int(number)
        if count > api.MAX_REPLICAS:
            fail(
                [f"--gpus: {name}={count} is more than {api.MAX_REPLICAS} instances"], EXIT_INVALID
            )
        counts[name] = count
    return counts


@click.command("simulate")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    help="Total request rate in req/s, instead of spec.workload.totalRate (the plan is solved "
    "for it and the trace drawn at it).",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True, max=MAX_DURATION),
    help="Seconds of traffic [default: 600; with --trace, the whole log].",
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**63 - 1),
    default=0,
    show_default=True,
    help="Seeds the arrivals, the request sizes and the router's draws.",
)
@click.option(
    "--routing",
    type=click.Choice(["size-aware", "size-aware-output", "round-robin"]),
    default="size-aware",
    show_default=True,
    help="size-aware: the routing table's GPU type for the request's input length (its output "
    "length unknown), then the instance of that type with the fewest outstanding requests; "
    "size-aware-output: the same by input and output length (clients whose max_tokens is "
    "their real length); round-robin: every instance in turn, whatever the request's size.",
)
@click.option(
    "--gpus",
    "gpus_option",
    metavar="TYPE=N,...",
    help="Simulate this fleet instead of the plan's (types not named get no instance); "
    "traffic is still split by the plan's routing table, among the types present.",
)
@click.option(
    "--tpot",
    type=click.FloatRange(min=0, min_open=True),
    help="TPOT SLO in seconds for GPU types whose throughput matches no shipped profile (an "
    "engine is then fitted to the matrix); a shipped profile's own SLO is used otherwise.",
)
@click.option(
    "--ttft-slo",
    type=click.FloatRange(min=0, min_open=True),
    help="Also report the share of requests within the TPOT SLO whose time to first token is "
    "within this many seconds (a queue shows in TTFT, not always in TPOT).",
)
@click.option(
    "--trace",
    "trace_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Replay the requests of this log (`melange workload`'s formats) instead of Poisson "
    "arrivals: at their timestamps, or at the rate when they have none.",
)
@table_format()
def simulate_command(
    file: str,
    rate: float | None,
    duration: float | None,
    seed: int,
    routing: str,
    gpus_option: str | None,
    tpot: float | None,
    ttft_slo: float | None,
    trace_file: Path | None,
    output: str,
) -> None:
    """Simulate the plan for the allocation in FILE ('-' reads stdin) request by request.

    Solves FILE as `melange solve` does, builds a continuous-batching engine per GPU type
    calibrated to its profile, sends Poisson traffic drawn from the workload (or a request log)
    through the routing policy, and prints the cost per hour, TTFT and TPOT percentiles and the
    share of requests whose TPOT is within the SLO, per GPU type and overall. Deterministic for a
    seed. Exits 0 when simulated, 1 when the plan is infeasible, 2 when the input is invalid.
    """
    for name, value in (
        ("--rate", rate),
        ("--duration", duration),
        ("--tpot", tpot),
        ("--ttft-slo", ttft_slo),
    ):
        if value is not None and not math.isfinite(value):
            fail([f"{name}: must be a finite number, got {value}"], EXIT_INVALID)
    if rate is not None and rate > api.MAX_RATE:
        fail([f"--rate: must be <= {api.MAX_RATE}, got {rate:g}"], EXIT_INVALID)
    counts = parse_gpus(gpus_option)
    spec = read_allocation(file).spec
    names = [g.name for g in spec.gpus]
    if counts is not None:
        unknown = [name for name in counts if name not in names]
        if unknown:
            fail(
                [f"--gpus: {unknown[0]} is not a GPU type of {file} ({', '.join(names)})"],
                EXIT_INVALID,
            )
    total_rate = spec.workload.total_rate if rate is None else rate
    if trace_file is None:
        seconds = 600.0 if duration is None else duration
        if total_rate * seconds > MAX_REQUESTS:
            fail(
                [f"{total_rate:g} req/s for {seconds:g} s is more than {MAX_REQUESTS} requests"],
                EXIT_INVALID,
            )

    from melange.plan import routing as route
    from melange.plan import solver
    from melange.plan.problem import Problem
    from melange.tools import simulate as sim

    engines = engines_for(spec, tpot)
    started = time.monotonic()
    problem = Problem.from_spec(spec, rate=rate)
    plan = solver.solve(problem, started=started)
    if not plan.solved:
        fail([f"{plan.status.lower()}: {plan.reason}"], EXIT_INFEASIBLE)
    table = route.derive(problem, plan)
    fleet = plan.replicas() if counts is None else {n: counts.get(n, 0) for n in names}
    if trace_file is not None:
        trace = _read_trace(trace_file, rate, total_rate, seed, duration)
    else:
        trace = sim.poisson_trace(
            spec.buckets.input_tokens,
            spec.buckets.output_tokens,
            problem.rates,
            600.0 if duration is None else duration,
            seed,
        )
    if len(trace) and not any(fleet.values()):
        fail(["the fleet has no instance: give one with --gpus TYPE=N"], EXIT_INVALID)
    began = time.perf_counter()
    present = [name for name, count in fleet.items() if count]
    choose = route.chooser(table, present)
    report = sim.simulate(engines, fleet, trace, routing, choose, seed, ttft_slo)  # type: ignore[arg-type]
    seconds = time.perf_counter() - began
    data = _report_dict(report, table, plan.replicas(), seed, seconds)
    if output == "table":
        click.echo(_render(report, table, plan.replicas(), seed, seconds, ttft_slo), nl=False)
    else:
        click.echo(dump(data, output), nl=False)


def engines_for(spec: api.AllocationSpec, tpot: float | None) -> list[sim.Engine]:
    """An engine per GPU type: from its shipped profile's perfmodel inputs when its matrix is a
    shipped one, else fitted to its matrix at --tpot; a type with neither exits 2."""
    from melange.tools import profiles
    from melange.tools import simulate as sim

    shipped = [profiles.load_profile(p.name) for p in profiles.list_profiles()]
    ins, outs = spec.buckets.input_tokens, spec.buckets.output_tokens
    engines = []
    for k, gpu in enumerate(spec.gpus):
        match = sim.matching_estimate(gpu.name, gpu.throughput, ins, outs, shipped)
        try:
            if match is not None:
                engines.append(
                    sim.engine_from_estimate(
                        gpu.name, gpu.cost_per_hour, gpu.throughput, ins, outs, match["estimate"]
                    )
                )
            elif tpot is not None:
                engines.append(
                    sim.fit_engine(gpu.name, gpu.cost_per_hour, gpu.throughput, ins, outs, tpot)
                )
            else:
                fail(
                    [
                        f"gpus[{k}] ({gpu.name}): its throughput matches no shipped profile, so "
                        "its TPOT SLO is unknown; give it with --tpot SECONDS"
                    ],
                    EXIT_INVALID,
                )
        except ValueError as exc:
            fail([f"gpus[{k}] ({gpu.name}): {exc}"], EXIT_INVALID)
    return engines


def _read_trace(
    path: Path, rate: float | None, fallback_rate: float, seed: int, duration: float | None
) -> sim.Trace:
    """The requests of a log as a trace: at their timestamps, else at `rate` (or, when not given,
    `fallback_rate`, the spec's); an unreadable log or one with no request exits 2."""
    from melange.tools import simulate as sim
    from melange.tools import workload

    scan = workload.Scan()
    try:
        with path.open("rb") as raw:
            first = ""
            for line in raw:
                if line.strip():
                    first = line.decode("utf-8", "replace")
                    break
            raw.seek(0)
            fmt = workload.detect_format(path, first)
            requests = [
                (r.input_tokens, r.output_tokens, r.timestamp)
                for _, r in workload.read_requests(raw, fmt, scan)
            ]
    except OSError as exc:
        fail([f"--trace {path}: cannot read: {exc.strerror or exc}"], EXIT_INVALID)
    except workload.WorkloadError as exc:
        fail([f"--trace {path}: {exc}"], EXIT_INVALID)
    if scan.bad:
        click.echo(
            f"warning: --trace {path}: {scan.bad} lines could not be read (skipped)", err=True
        )
    stamped = all(t is not None for _, _, t in requests)
    pace = rate if rate is not None or stamped else fallback_rate
    try:
        trace = sim.trace_of(requests, pace, seed)
    except ValueError as exc:
        fail([f"--trace {path}: {exc} with --rate"], EXIT_INVALID)
    if not len(trace):
        fail([f"--trace {path}: no request with an output token to replay"], EXIT_INVALID)
    if duration is not None:
        keep = trace.arrivals < duration
        trace = sim.Trace(
            trace.arrivals[keep], trace.input_tokens[keep], trace.output_tokens[keep], duration
        )
    return trace


def _ms(values: tuple[float, ...], scale: float) -> list[float | None]:
    return [None if math.isnan(v) else round(v * scale, 4) for v in values]


def _report_dict(
    report: sim.Report, table: Any, planned: dict[str, int], seed: int, seconds: float
) -> dict[str, Any]:
    def stats(s: sim.Stats) -> dict[str, Any]:
        return {
            "name": s.name,
            "instances": s.instances,
            "costPerHour": round(s.cost_per_hour, 6),
            "requests": s.requests,
            "load": round(s.load, 6),
            "ttftSeconds": dict(zip(("p50", "p90", "p99"), _ms(s.ttft, 1.0), strict=True)),
            "tpotSeconds": dict(zip(("p50", "p90", "p99"), _ms(s.tpot, 1.0), strict=True)),
            "withinSlo": None if math.isnan(s.within_slo) else round(s.within_slo, 6),
            "withinSloAndTtft": None
            if math.isnan(s.within_slo_and_ttft)
            else round(s.within_slo_and_ttft, 6),
            "unservable": s.unservable,
        }

    plan_load = dict(zip(table.gpus, table.plan_load, strict=True))
    return {
        "routing": report.routing,
        "seed": seed,
        "durationSeconds": round(report.duration, 6),
        "requests": report.requests,
        "costPerHour": round(report.total.cost_per_hour, 6),
        "withinSlo": None
        if math.isnan(report.total.within_slo)
        else round(report.total.within_slo, 6),
        "total": stats(report.total),
        "gpus": [
            {
                **stats(s),
                "plannedInstances": planned.get(s.name, 0),
                "planLoad": round(plan_load.get(s.name, 0.0), 6),
                "calibration": calibration,
                "calibrationError": round(error, 6),
            }
            for s, (_, calibration, error) in zip(report.gpus, report.calibration, strict=True)
        ],
        "inputRoutingLoadError": round(table.input_load_error, 6),
        "simulationSeconds": round(seconds, 3),
    }


def _render(
    report: sim.Report,
    table: Any,
    planned: dict[str, int],
    seed: int,
    seconds: float,
    ttft_slo: float | None,
) -> str:
    from melange.plan.report import format_table

    def triple(values: tuple[float, ...], scale: float, digits: int) -> str:
        return "/".join("-" if math.isnan(v) else f"{v * scale:.{digits}f}" for v in values)

    plan_load = dict(zip(table.gpus, table.plan_load, strict=True))
    rows = []
    for s in (*report.gpus, report.total):
        if s.name != "total" and not s.instances and not s.requests:
            continue
        load = f"{s.load:.2f}"
        if s.name != "total":
            load += f" / {plan_load.get(s.name, 0.0):.2f}"
        rows.append(
            [
                s.name,
                str(s.instances),
                f"{s.cost_per_hour:.2f}",
                str(s.requests),
                load,
                triple(s.ttft, 1.0, 2),
                triple(s.tpot, 1000.0, 0),
                "-" if math.isnan(s.within_slo) else f"{s.within_slo:.1%}",
                *(
                    []
                    if ttft_slo is None
                    else [
                        "-" if math.isnan(s.within_slo_and_ttft) else f"{s.within_slo_and_ttft:.1%}"
                    ]
                ),
            ]
        )
    header = [
        "GPU",
        "INSTANCES",
        "COST/H",
        "REQUESTS",
        "LOAD / PLAN",
        "TTFT P50/P90/P99 S",
        "TPOT P50/P90/P99 MS",
        "TPOT OK",
        *([] if ttft_slo is None else [f"TPOT+TTFT<={ttft_slo:g}S OK"]),
    ]
    lines = format_table(header, rows)
    lines.append("")
    rate = report.requests / report.duration if report.duration > 0 else 0.0
    lines.append(
        f"traffic:  {report.requests} requests over {report.duration:.0f} s "
        f"({rate:.3g} req/s), seed {seed}"
    )
    routing: str = report.routing
    if routing == "size-aware":
        routing += (
            f" (by input length; expected loads within {table.input_load_error:.1%} of the plan's)"
        )
    lines.append(f"routing:  {routing}")
    engines = ", ".join(
        f"{name} {how}" + (f" (fit error {error:.0%})" if how == "fitted" else "")
        for name, how, error in report.calibration
        if any(s.name == name and (s.instances or s.requests) for s in report.gpus)
    )
    lines.append(f"engines:  {engines or '(none in use)'}")
    changed = [
        f"{s.name} {planned.get(s.name, 0)}->{s.instances}"
        for s in report.gpus
        if s.instances != planned.get(s.name, 0)
    ]
    if changed:
        lines.append(f"fleet:    not the plan's ({', '.join(changed)})")
    lines.append(
        "TPOT OK:  the share of requests whose TPOT (decode time per output token after the first) "
        "is within their GPU type's SLO"
    )
    lines.append(f"took:     {seconds:.2f} s")
    return "\n".join(lines) + "\n"
