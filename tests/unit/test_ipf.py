"""Iterative proportional fitting and the re-binning of Prometheus histograms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from melange.signals import ipf

PRIOR = np.array([[16.0, 6.0, 1.0], [6.0, 3.0, 2.0], [2.0, 1.0, 0.0]])


def assert_marginals(matrix: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
    """Every row and column sum within 1e-9 of its marginal (relative to the total, if above 1)."""
    atol = 1e-9 * max(1.0, float(rows.sum()))
    np.testing.assert_allclose(matrix.sum(axis=1), rows, rtol=0, atol=atol)
    np.testing.assert_allclose(matrix.sum(axis=0), cols, rtol=0, atol=atol)


def test_fit_matches_the_marginals() -> None:
    rows, cols = np.array([10.0, 20.0, 5.0]), np.array([12.0, 13.0, 10.0])
    result = ipf.fit(PRIOR, rows, cols)
    assert result.converged
    assert result.iterations > 0
    assert_marginals(result.matrix, rows, cols)
    assert result.matrix[2, 2] == 0  # a zero cell of the prior stays zero
    assert PRIOR[0, 0] == 16  # the prior is not modified


def test_a_prior_that_already_fits_is_returned_unchanged() -> None:
    result = ipf.fit(PRIOR, PRIOR.sum(axis=1), PRIOR.sum(axis=0))
    assert result.iterations == 0
    np.testing.assert_array_equal(result.matrix, PRIOR)
    scaled = ipf.fit(PRIOR / 37, PRIOR.sum(axis=1) / 37, PRIOR.sum(axis=0) / 37)
    np.testing.assert_allclose(scaled.matrix, PRIOR / 37, rtol=1e-12)


def test_the_fit_keeps_the_prior_odds_ratios() -> None:
    """The KL-closest fit is diag(a) P diag(b): every 2x2 cross-product ratio of P survives."""
    prior = np.array([[4.0, 1.0], [2.0, 3.0]])
    matrix = ipf.fit(prior, [7.0, 3.0], [5.0, 5.0]).matrix
    odds = matrix[0, 0] * matrix[1, 1] / (matrix[0, 1] * matrix[1, 0])
    assert odds == pytest.approx(4 * 3 / (1 * 2), rel=1e-9)


def test_totals_must_agree_or_be_rescaled() -> None:
    with pytest.raises(
        ipf.InconsistentMarginalsError, match="sum to 35 and the column marginals to 36"
    ):
        ipf.fit(PRIOR, [10, 20, 5], [12, 14, 10])
    result = ipf.fit(PRIOR, [10, 20, 5], [12, 14, 10], rescale=True)
    assert result.matrix.sum() == pytest.approx(1.0)
    assert_marginals(result.matrix, np.array([10, 20, 5]) / 35, np.array([12, 14, 10]) / 36)


def test_a_positive_marginal_with_no_prior_mass_is_rejected() -> None:
    prior = np.array([[1.0, 0.0], [1.0, 0.0]])
    with pytest.raises(ipf.IpfError, match="column 1 has marginal 1 but the prior has no mass"):
        ipf.fit(prior, [1, 1], [1, 1])


def test_non_convergence_is_reported() -> None:
    # The only matrix with these marginals puts 0 where the prior has mass: IPF only approaches it.
    prior = np.array([[1.0, 1.0], [1.0, 0.0]])
    with pytest.raises(ipf.NotConvergedError, match="did not converge in 200 iterations") as info:
        ipf.fit(prior, [1, 1], [1, 1], max_iterations=200)
    assert not info.value.result.converged
    assert info.value.result.residual > 1e-12


@pytest.mark.parametrize(
    ("prior", "rows", "cols", "message"),
    [
        ([1, 2], [1], [1], "2-dimensional"),
        ([[1, -1]], [0], [0, 0], "finite numbers >= 0"),
        ([[1, math.nan]], [1], [1, 0], "finite numbers >= 0"),
        ([[1, 1]], [1, 1], [1, 1], "row marginals: must have 1 entries, got 2"),
        ([[1, 1]], [2], [2], "column marginals: must have 2 entries, got 1"),
        ([[1, 1]], [-2], [-1, -1], "must be >= 0"),
    ],
)
def test_invalid_inputs(prior: object, rows: object, cols: object, message: str) -> None:
    with pytest.raises(ipf.IpfError, match=message):
        ipf.fit(prior, rows, cols)  # type: ignore[arg-type]


positive = st.floats(min_value=0.1, max_value=100, allow_nan=False)


@st.composite
def fitting_problem(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A prior with some zero cells, and marginals of a matrix with the same zero pattern."""
    n_rows = draw(st.integers(1, 6))
    n_cols = draw(st.integers(1, 6))
    prior = np.array([[draw(positive) for _ in range(n_cols)] for _ in range(n_rows)])
    zeros = np.array(
        [[draw(st.booleans()) and (i + j) % 2 == 1 for j in range(n_cols)] for i in range(n_rows)]
    )
    prior[zeros] = 0.0
    target = np.array([[draw(positive) for _ in range(n_cols)] for _ in range(n_rows)])
    target[zeros] = 0.0
    return prior, target.sum(axis=1), target.sum(axis=0), zeros


@settings(max_examples=100, deadline=None)
@given(fitting_problem())
def test_property_marginals_zeros_and_scale(
    problem: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    prior, rows, cols, zeros = problem
    result = ipf.fit(
        prior, rows, cols, max_iterations=100_000
    )  # near-boundary fits converge slowly
    assert result.converged
    assert_marginals(result.matrix, rows, cols)
    assert np.all(result.matrix[zeros] == 0)
    assert np.all(result.matrix >= 0)
    # a prior of any scale gives the same fit
    rescaled = ipf.fit(prior * 1000, rows, cols, max_iterations=100_000).matrix
    np.testing.assert_allclose(rescaled, result.matrix, rtol=1e-8, atol=1e-9 * max(1.0, rows.sum()))


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 5), st.integers(2, 5), st.data())
def test_property_fit_is_a_row_and_column_scaling_of_the_prior(
    n_rows: int, n_cols: int, data: st.DataObject
) -> None:
    prior = np.array([[data.draw(positive) for _ in range(n_cols)] for _ in range(n_rows)])
    target = np.array([[data.draw(positive) for _ in range(n_cols)] for _ in range(n_rows)])
    matrix = ipf.fit(prior, target.sum(axis=1), target.sum(axis=0)).matrix
    ratio = matrix / prior  # = a_i * b_j: rank one, so log(ratio) is additive
    logs = np.log(ratio)
    additive = logs[:, :1] + logs[:1, :] - logs[0, 0]
    np.testing.assert_allclose(logs, additive, atol=1e-7)


# --- re-binning -----------------------------------------------------------------------------------

INF = math.inf


def test_rebin_is_integer_aware() -> None:
    # vLLM-style 1-2-5 buckets: 4 requests of 1 token, 6 of 2, 30 of 3..5, 60 of 6..10
    bounds = [1, 2, 5, 10, INF]
    cumulative = [4, 10, 40, 100, 100]
    rebinned = ipf.rebin_histogram(bounds, cumulative, [1, 3, 8])
    # [1,3) holds 1 and 2: 4 + 6; the (2,5] bucket spreads 30 over {3,4,5}: all in [3,8);
    # the (5,10] bucket spreads 60 over {6..10}: 6 and 7 in [3,8) (24), 8..10 above (36)
    np.testing.assert_allclose(rebinned.counts, [10, 30 + 24])
    assert rebinned.below == 0
    assert rebinned.above == pytest.approx(36)


def test_rebin_below_above_and_the_inf_bucket() -> None:
    rebinned = ipf.rebin_histogram([0, 100, INF], [5, 105, 125], [1, 51, 101, 1000])
    # 5 requests of 0 tokens lie below edge 1; (0,100] spreads 100 over 1..100; +Inf: 20 above
    np.testing.assert_allclose(rebinned.counts, [50, 50, 0])
    assert (rebinned.below, rebinned.above) == (5, 20)


def test_rebin_rejects_bad_histograms() -> None:
    with pytest.raises(ipf.IpfError, match="decreases at le=5"):
        ipf.rebin_histogram([1, 5, INF], [10, 8, 12], [1, 10])
    with pytest.raises(ipf.IpfError, match="strictly increasing"):
        ipf.rebin_histogram([5, 1], [1, 2], [1, 10])
    with pytest.raises(ipf.IpfError, match="as many cumulative counts as bounds"):
        ipf.rebin_histogram([1, 2], [1], [1, 10])
    # a decrease within float noise (rate() over counters) is not an error
    ipf.rebin_histogram([1, 5, INF], [10, 10 - 1e-12, 12], [1, 10])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 5000), min_size=1, max_size=8, unique=True),
    st.lists(st.floats(0, 1000, allow_nan=False), min_size=9, max_size=9),
    st.lists(st.integers(1, 6000), min_size=2, max_size=6, unique=True),
    st.booleans(),
)
def test_property_rebin_conserves_the_total(
    bounds: list[int], steps: list[float], edges: list[int], with_inf: bool
) -> None:
    upper = sorted(bounds) + ([INF] if with_inf else [])
    cumulative = np.cumsum(steps[: len(upper)])
    rebinned = ipf.rebin_histogram(upper, cumulative.tolist(), sorted(edges))
    total = rebinned.counts.sum() + rebinned.below + rebinned.above
    assert total == pytest.approx(cumulative[-1], rel=1e-9, abs=1e-9)
    assert np.all(rebinned.counts >= -1e-12)


def test_fit_from_two_histograms() -> None:
    """The live case end to end: two histograms re-binned, then fitted to a prior."""
    edges_in, edges_out = [1, 100, 1000, 8000], [1, 100, 1000]
    prompts = ipf.rebin_histogram([99, 999, 7999, INF], [50, 90, 100, 100], edges_in)
    outputs = ipf.rebin_histogram([99, 999, INF], [70, 100, 100], edges_out)
    result = ipf.fit(PRIOR[:, :2] + 1, prompts.counts, outputs.counts)
    assert_marginals(result.matrix, np.array([50, 40, 10]), np.array([70, 30]))
