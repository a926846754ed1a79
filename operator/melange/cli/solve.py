"""`melange solve`: the cheapest certified plan for an allocation file, offline.

The solver (HiGHS, numpy) is imported when the command runs, not when its help is shown.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from melange import api
from melange.cli.util import (
    EXIT_INFEASIBLE,
    EXIT_INVALID,
    EXIT_UNSOLVED,
    dump,
    fail,
    fail_spec,
    load_named,
    read_allocation,
    read_spec,
    table_format,
    user_profiles_dir,
)
from melange.plan import report
from melange.plan import result as plan_result


@click.command()
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@table_format(
    "Output format; json and yaml hold the full plan including the per-bucket assignment."
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, max_open=False),
    help="Total request rate in req/s, instead of spec.workload.totalRate (at most 1e9).",
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
@click.option(
    "--profile",
    "profile_names",
    metavar="NAME",
    multiple=True,
    help="Add this profile's spec.gpus[] entry (shipped or imported; repeatable). FILE then needs "
    "only the buckets and the workload, e.g. the output of `melange workload`; a profile made for "
    "other bucket edges is refused.",
)
@click.option(
    "--profiles-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="User profile directory for --profile [default: $MELANGE_PROFILES_DIR, else "
    "$XDG_DATA_HOME/melange/profiles, else ~/.local/share/melange/profiles].",
)
def solve(
    file: str,
    output: str,
    rate: float | None,
    slice_factor: int | None,
    method: plan_result.Method,
    time_limit: float,
    profile_names: tuple[str, ...],
    profiles_dir: Path | None,
) -> None:
    """Print the cheapest plan for the allocation in FILE ('-' reads stdin).

    FILE is a MelangeAllocation manifest, or its bare spec, in YAML or JSON. The plan gives the
    replicas per GPU type, the cost per hour, a proven lower bound, and the saving against the best
    single-GPU-type plan. Exits 0 with a plan (status Optimal when proven, Feasible when the time limit
    cut the search short), 1 when infeasibility is proven, 2 when the input is invalid, 4 when the
    time limit ran out with neither a plan nor a proof.

    With --profile, FILE's buckets and workload are solved with the named profiles (added after
    any gpus FILE has); a profile made for other bucket edges than FILE's exits 2 with one line
    naming both.
    """
    started = time.monotonic()
    # NaN and inf pass FloatRange; a NaN time limit left no time at all
    if rate is not None and not math.isfinite(rate):
        fail([f"--rate: must be a finite number, got {rate}"], EXIT_INVALID)
    if rate is not None and rate > api.MAX_RATE:  # the bound of spec.workload.totalRate
        fail([f"--rate: must be <= {api.MAX_RATE}, got {rate:g}"], EXIT_INVALID)
    if not math.isfinite(time_limit):
        fail([f"--time-limit: must be a finite number of seconds, got {time_limit}"], EXIT_INVALID)
    if profile_names:
        spec = _with_profiles(file, profile_names, profiles_dir)
    else:
        spec = read_allocation(file).spec
    from melange.plan import solver
    from melange.plan.problem import Problem

    problem = Problem.from_spec(spec, rate=rate, slice_factor=slice_factor)
    plan = solver.solve(problem, method=method, time_limit=time_limit, started=started)
    if output == "table":
        click.echo(report.render_table(plan), nl=False)
    else:
        click.echo(dump(report.plan_to_dict(plan), output), nl=False)
    if plan.status == "Infeasible":
        fail([f"infeasible: {plan.reason}"], EXIT_INFEASIBLE)
    if plan.status == "Unsolved":
        fail([f"unsolved: {plan.reason}"], EXIT_UNSOLVED)


def _with_profiles(file: str, names: tuple[str, ...], directory: Path | None) -> api.AllocationSpec:
    """FILE's spec with a gpus[] entry per named profile; every problem exits 2."""
    from melange.tools import profiles

    raw, prefix = read_spec(file)
    user_dir = user_profiles_dir(directory)
    chosen = {name: load_named(name, user_dir) for name in dict.fromkeys(names)}
    composed: Any = raw  # not a mapping: its validation says so
    if isinstance(raw, Mapping):
        try:
            composed = profiles.compose_spec(raw, chosen)
        except profiles.ProfileError as exc:
            fail(exc.errors, EXIT_INVALID)
    try:
        return api.validate_spec(composed, prefix)
    except api.SpecError as exc:
        fail_spec(exc)
