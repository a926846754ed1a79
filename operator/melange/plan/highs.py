"""HiGHS, called in process on models built as arrays: no modelling layer between numpy and the solver.

Building a 16-type, 32x32-bucket model this way takes milliseconds, where a Python modelling layer
spends seconds creating one object per variable.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int32]
Outcome = Literal["optimal", "feasible", "infeasible", "unknown"]

# Tighter than the plan's own LOAD_EPSILON, so a solution HiGHS accepts is one the plan rules accept.
_FEASIBILITY_TOLERANCE = 1e-9
_COLWISE = 1
_MINIMIZE = 1


@dataclass(frozen=True)
class Milp:
    """min cost·x  s.t.  row_lower <= A x <= row_upper, col_lower <= x <= col_upper; A column-wise."""

    cost: Floats
    col_lower: Floats
    col_upper: Floats
    integer: npt.NDArray[np.bool_]
    rows: Ints  # the nonzeros' row, column and value, in any order
    cols: Ints
    values: Floats
    row_lower: Floats
    row_upper: Floats


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    x: Floats | None  # the best solution found (None when there is none)
    objective: float | None
    bound: float  # a proven lower bound on the objective (-inf when none)


@functools.cache
def _silence_banner() -> None:
    """HiGHS prints a banner to the C stdout when its first instance is built, before any option can
    turn it off; `melange solve -o json` must print JSON alone, so build that first one muted."""
    import highspy

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            highspy.Highs()  # type: ignore[no-untyped-call]
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def load(model: Milp, abs_gap: float = 0.0, presolve: bool = True) -> Any:
    """A HiGHS instance holding `model`, quiet and deterministic; `abs_gap` stops a MIP once its
    solution is within that of the bound. `presolve=False` for the small models of the
    decomposition: on some of them HiGHS 1.16's presolve loops and never reads its time limit."""
    import highspy

    _silence_banner()
    order = np.lexsort((model.rows, model.cols))
    columns = len(model.cost)
    starts = np.zeros(columns + 1, dtype=np.int32)
    np.cumsum(np.bincount(model.cols, minlength=columns), out=starts[1:])
    h = highspy.Highs()  # type: ignore[no-untyped-call]
    for option, value in (
        ("output_flag", False),
        ("primal_feasibility_tolerance", _FEASIBILITY_TOLERANCE),
        ("mip_feasibility_tolerance", _FEASIBILITY_TOLERANCE),
        ("mip_rel_gap", 0.0),
        ("mip_abs_gap", abs_gap),
        ("random_seed", 0),
        ("presolve", "on" if presolve else "off"),
    ):
        h.setOptionValue(option, value)
    h.passModel(
        columns,
        len(model.row_lower),
        len(model.values),
        _COLWISE,
        _MINIMIZE,
        0.0,
        model.cost,
        model.col_lower,
        model.col_upper,
        model.row_lower,
        model.row_upper,
        starts,
        model.rows[order].astype(np.int32),
        model.values[order],
        model.integer.astype(np.int32),
    )
    return h


def solve(
    model: Milp,
    time_limit: float | None = None,
    abs_gap: float = 0.0,
    presolve: bool = True,
) -> Result:
    """Solve `model` once."""
    import highspy

    h = load(model, abs_gap, presolve)
    if time_limit is not None:
        h.setOptionValue("time_limit", max(time_limit, 1e-3))
    h.run()
    status = h.getModelStatus()
    info = h.getInfo()
    has_solution = info.primal_solution_status == highspy.SolutionStatus.kSolutionStatusFeasible
    x = np.array(h.getSolution().col_value, dtype=np.float64) if has_solution else None
    objective = float(info.objective_function_value) if has_solution else None
    if status in (
        highspy.HighsModelStatus.kInfeasible,
        highspy.HighsModelStatus.kUnboundedOrInfeasible,
    ):
        return Result("infeasible", None, None, float("inf"))
    optimal = status == highspy.HighsModelStatus.kOptimal
    if model.integer.any():
        bound = float(info.mip_dual_bound)
    else:  # an LP's optimum is its own bound (strong duality); nothing else is proven
        bound = objective if optimal and objective is not None else -float("inf")
    if x is None:
        return Result("unknown", None, None, bound)
    return Result("optimal" if optimal else "feasible", x, objective, bound)
