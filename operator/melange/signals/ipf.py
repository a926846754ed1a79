"""Iterative proportional fitting, and re-binning of Prometheus histograms onto bucket edges.

The live case: vLLM exports the prompt length and the generation length of finished requests as two
separate histograms (`vllm:request_prompt_tokens`, `vllm:request_generation_tokens`), which give
the row and column marginals of the workload matrix but not the joint distribution. `fit` takes a
prior joint matrix (the distribution last measured from a request log, or the spec's) and returns
the matrix with exactly those marginals that is closest to the prior in Kullback-Leibler divergence:
iterative proportional fitting (alternately scaling rows and columns) converges to it whenever
such a matrix exists. Cells that are zero in the prior stay zero.

`rebin_histogram` turns a cumulative Prometheus histogram (`le` upper bounds -> counts) into counts
over melange bucket edges, interpolating linearly within each histogram bucket.

Pure functions over numpy arrays: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

DEFAULT_TOLERANCE = 1e-10
DEFAULT_MAX_ITERATIONS = 10_000
TOTALS_RTOL = 1e-9

FloatArray = NDArray[np.float64]


class IpfError(ValueError):
    """The inputs admit no fit (bad shapes or values, totals that differ, structural zeros)."""


class InconsistentMarginalsError(IpfError):
    """Row and column marginals have different totals, and `rescale` was not asked for."""


class NotConvergedError(IpfError):
    """The iteration stopped at `max_iterations` before the marginals matched within tolerance.

    `result` holds the last iterate; it happens when the prior's zero cells leave no matrix with
    exactly these marginals (IPF then approaches the closest one it can reach, ever more slowly).
    """

    def __init__(self, result: IpfResult) -> None:
        self.result = result
        super().__init__(
            f"iterative proportional fitting did not converge in {result.iterations} iterations: "
            f"the marginals are still off by {result.residual:.3g} (relative to the total); the "
            "prior's zero cells may leave no matrix with these marginals"
        )


@dataclass(frozen=True)
class IpfResult:
    matrix: FloatArray
    iterations: int  # full row+column sweeps; 0 when the prior already had the marginals
    residual: float  # largest marginal mismatch, relative to the total
    converged: bool


def _vector(values: ArrayLike, what: str) -> FloatArray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise IpfError(f"{what}: must be a 1-dimensional sequence, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise IpfError(f"{what}: must be finite numbers")
    if np.any(array < 0):
        raise IpfError(f"{what}: must be >= 0, got {float(array.min())}")
    return array


def _residual(matrix: FloatArray, rows: FloatArray, cols: FloatArray, total: float) -> float:
    if total == 0:
        return 0.0
    row_error = float(np.max(np.abs(matrix.sum(axis=1) - rows)))
    col_error = float(np.max(np.abs(matrix.sum(axis=0) - cols)))
    return max(row_error, col_error) / total


def _scale(current: FloatArray, target: FloatArray) -> FloatArray:
    """Factors that bring `current` sums to `target`; 0 where the current sum is 0."""
    factors = np.zeros_like(target)
    np.divide(target, current, out=factors, where=current > 0)
    return factors


def fit(
    prior: ArrayLike,
    row_marginals: ArrayLike,
    col_marginals: ArrayLike,
    *,
    rescale: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
) -> IpfResult:
    """The matrix with these row and column sums that is closest to `prior` (minimum KL divergence).

    `prior` is an `R x C` matrix of non-negative numbers (any scale), `row_marginals` has `R` entries
    and `col_marginals` `C`. The two marginals must have the same total (within a relative 1e-9),
    else `InconsistentMarginalsError`; with `rescale=True` both are normalised to sum 1 instead,
    and so is the result: use it when the two totals are counted differently (e.g. requests beyond
    the last edge dropped from one histogram but not the other) and only the shape matters.

    Converged means every row and column sum is within `tolerance * total` of its marginal. Raises
    `IpfError` when no fit exists for a plain reason (a positive marginal whose row or column is
    all zero in the prior, a prior with no mass while the marginals have some), and
    `NotConvergedError` (with the last iterate) after `max_iterations` sweeps.
    """
    matrix = np.array(prior, dtype=np.float64)  # a copy: the caller's prior is never modified
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise IpfError(f"prior: must be a non-empty 2-dimensional matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)) or np.any(matrix < 0):
        raise IpfError("prior: must hold finite numbers >= 0")
    rows = _vector(row_marginals, "row marginals")
    cols = _vector(col_marginals, "column marginals")
    if rows.shape[0] != matrix.shape[0]:
        raise IpfError(f"row marginals: must have {matrix.shape[0]} entries, got {rows.shape[0]}")
    if cols.shape[0] != matrix.shape[1]:
        raise IpfError(
            f"column marginals: must have {matrix.shape[1]} entries, got {cols.shape[0]}"
        )
    if tolerance <= 0 or max_iterations < 1:
        raise IpfError("tolerance must be > 0 and max_iterations >= 1")

    row_total, col_total = float(rows.sum()), float(cols.sum())
    if rescale:
        if row_total == 0 or col_total == 0:
            raise IpfError("cannot rescale marginals that sum to 0")
        rows, cols = rows / row_total, cols / col_total
        prior_total = float(matrix.sum())
        if prior_total > 0:
            matrix /= prior_total
        row_total = col_total = 1.0
    elif not math.isclose(row_total, col_total, rel_tol=TOTALS_RTOL, abs_tol=0.0):
        raise InconsistentMarginalsError(
            f"the row marginals sum to {row_total:.12g} and the column marginals to "
            f"{col_total:.12g}; they must count the same requests (or pass rescale=True to "
            "fit their proportions only)"
        )
    total = row_total

    for what, target, mass in (
        ("row", rows, matrix.sum(axis=1)),
        ("column", cols, matrix.sum(axis=0)),
    ):
        empty = np.flatnonzero((target > 0) & (mass == 0))
        if empty.size:
            raise IpfError(
                f"{what} {int(empty[0])} has marginal {float(target[empty[0]]):.6g} but the prior "
                f"has no mass in that {what}: no fit keeps the prior's zero cells"
            )

    residual = _residual(matrix, rows, cols, total)
    iterations = 0
    while residual > tolerance:
        if iterations >= max_iterations:
            raise NotConvergedError(IpfResult(matrix, iterations, residual, converged=False))
        matrix *= _scale(matrix.sum(axis=1), rows)[:, np.newaxis]
        matrix *= _scale(matrix.sum(axis=0), cols)[np.newaxis, :]
        iterations += 1
        residual = _residual(matrix, rows, cols, total)
    return IpfResult(matrix, iterations, residual, converged=True)


@dataclass(frozen=True)
class Rebinned:
    """A histogram's counts over melange buckets, and the mass that falls outside the edges."""

    counts: FloatArray  # one per bucket [edges[k], edges[k+1])
    below: float  # mass below edges[0]
    above: float  # mass at or above edges[-1], including everything in the +Inf bucket


def rebin_histogram(
    bounds: Sequence[float], cumulative: Sequence[float], edges: Sequence[int]
) -> Rebinned:
    """Spread a cumulative Prometheus histogram of token counts over melange bucket edges.

    `bounds` are the histogram's `le` upper bounds in increasing order (the last may be `+Inf`),
    `cumulative` the matching cumulative counts (or rates: any non-negative scale), `edges` the
    melange edges (bucket k is `[edges[k], edges[k+1])` tokens).

    Token counts are integers, so the histogram bucket `(a, b]` holds the integers
    `floor(a)+1 .. floor(b)`: its mass is spread uniformly over `[floor(a)+1, floor(b)+1)` and each
    melange bucket gets the share that overlaps it. The first histogram bucket starts at 1 token
    (every request has at least one); a first bound below 1 holds zero-token requests, which lie
    below every melange bucket.
    The mass of the `+Inf` bucket (above the last finite bound) has no upper end to interpolate to:
    it is counted in `above`, even when the melange edges reach beyond the last finite bound.
    A histogram bucket that holds no integer (e.g. `(1.2, 1.7]`) puts its mass at its upper bound.

    `sum(counts) + below + above` equals the histogram's total. Decreasing cumulative counts (a
    counter reset inside a `rate()` window, say) beyond float noise raise `IpfError`.
    """
    upper = np.asarray(bounds, dtype=np.float64)
    cum = np.asarray(cumulative, dtype=np.float64)
    edge = np.asarray(edges, dtype=np.float64)
    if upper.ndim != 1 or upper.size == 0 or upper.shape != cum.shape:
        raise IpfError(
            f"histogram: needs as many cumulative counts as bounds, got {upper.size} bounds "
            f"and {cum.size} counts"
        )
    if np.any(np.isnan(upper)) or np.any(np.diff(upper) <= 0):
        raise IpfError("histogram: the le bounds must be strictly increasing")
    if not np.all(np.isfinite(cum)) or np.any(cum < 0):
        raise IpfError("histogram: the cumulative counts must be finite numbers >= 0")
    steps = np.diff(cum, prepend=0.0)
    noise = 1e-9 * max(float(cum[-1]), 1.0)
    if np.any(steps < -noise):
        k = int(np.argmax(steps < -noise))
        raise IpfError(
            f"histogram: the cumulative count decreases at le={upper[k]:g} "
            f"({cum[k - 1]:.6g} -> {cum[k]:.6g})"
        )
    steps = np.maximum(steps, 0.0)
    if edge.ndim != 1 or edge.size < 2 or np.any(np.diff(edge) <= 0):
        raise IpfError("edges: must be at least 2 strictly increasing numbers")

    counts = np.zeros(edge.size - 1)
    below = above = 0.0
    lower_bound = 0.0  # the first bucket holds the integers 1 .. floor(b)
    for b, mass in zip(upper, steps, strict=True):
        if math.isinf(b):
            above += float(mass)
            continue
        low, high = math.floor(lower_bound) + 1.0, math.floor(b) + 1.0
        lower_bound = float(b)
        if mass == 0:
            continue
        if high <= low:  # no integer inside: a point mass at the bound
            k = int(np.searchsorted(edge, b, side="right")) - 1
            if k < 0:
                below += float(mass)
            elif k >= counts.size:
                above += float(mass)
            else:
                counts[k] += mass
            continue
        width = high - low
        below += float(mass) * max(0.0, min(high, edge[0]) - low) / width
        above += float(mass) * max(0.0, high - max(low, edge[-1])) / width
        overlap = np.clip(np.minimum(edge[1:], high) - np.maximum(edge[:-1], low), 0.0, None)
        counts += mass * overlap / width
    return Rebinned(counts=counts, below=below, above=above)
