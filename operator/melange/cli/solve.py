"""`melange solve`: the cheapest certified plan for an allocation file, offline.

The solver (HiGHS, numpy) is imported when the command runs, not when its help is shown.
"""

from __future__ import annotations

import math
import time

import click

from melange import api
from melange.cli.util import (
    EXIT_INFEASIBLE,
    EXIT_INVALID,
    EXIT_UNSOLVED,
    dump,
    fail,
    read_allocation,
)
from melange.plan import report
from melange.plan import result as plan_result


@click.command()
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json", "yaml"]),
    default="table",
    show_default=True,
    help="Output format; json and yaml hold the full plan including the per-bucket assignment.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, max_open=False),
    help="Total request rate in req/s, instead of spec.workload.totalRate.",
)
@click.option(
    "--slice-factor",
    type=click.IntRange(1, api.MAX_SLICE_FACTOR),
    help="Slices per bucket, instead of spec.sliceFactor.",
)
@click.option(
    "--method",
    type=click.Choice(list(plan_result.METHODS)),
    default=plan_result.DEFAULT_METHOD,
    show_default=True,
    help="decomposition: branch on the replica counts, repair split buckets (fast at the CRD's "
    "full size); direct: the whole counted-form MILP in HiGHS. Both are certified and exact.",
)
@click.option(
    "--time-limit",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds for the whole command, reading the input included; past it the best plan found "
    "is printed as 'Feasible' with its gap to the lower bound.",
)
def solve(
    file: str,
    output: str,
    rate: float | None,
    slice_factor: int | None,
    method: plan_result.Method,
    time_limit: float,
) -> None:
    """Print the cheapest plan for the allocation in FILE ('-' reads stdin).

    FILE is a MelangeAllocation manifest, or its bare spec, in YAML or JSON. The plan gives the
    replicas per GPU type, the cost per hour, a proven lower bound, and the saving against the best
    single-GPU-type plan. Exits 0 with a plan (status Optimal when proven, Feasible when the time limit
    cut the search short), 1 when infeasibility is proven, 2 when the input is invalid, 4 when the
    time limit ran out with neither a plan nor a proof.
    """
    started = time.monotonic()
    allocation = read_allocation(file)
    if rate is not None and math.isnan(rate):  # NaN passes FloatRange
        fail([f"--rate: must be a finite number, got {rate}"], EXIT_INVALID)
    from melange.plan import solver
    from melange.plan.problem import Problem

    problem = Problem.from_spec(allocation.spec, rate=rate, slice_factor=slice_factor)
    plan = solver.solve(problem, method=method, time_limit=time_limit, started=started)
    if output == "table":
        click.echo(report.render_table(plan), nl=False)
    else:
        click.echo(dump(report.plan_to_dict(plan), output), nl=False)
    if plan.status == "Infeasible":
        fail([f"infeasible: {plan.reason}"], EXIT_INFEASIBLE)
    if plan.status == "Unsolved":
        fail([f"unsolved: {plan.reason}"], EXIT_UNSOLVED)
