"""The live request-size distribution: vLLM's token histograms -> the workload matrix -> drift.

vLLM exports how many prompt tokens and how many generated tokens each finished request had as two
separate histograms, so Prometheus knows the workload matrix's row sums and column sums but not
the matrix. Over a window, `observe` re-bins both histograms' increase onto the bucket edges
(`ipf.rebin_histogram`) and fits the joint matrix to them starting from the spec's matrix
(`ipf.fit`): the result has exactly the observed marginals and is otherwise as close to the spec's
matrix as possible. `drift` compares it with the matrix the plan was solved for (total variation
distance: the share of requests that would have to move between buckets), so the operator
re-solves when the shape of the traffic changes as well as when its rate does.

Pure functions: the queries are strings, the answers are parsed from Prometheus' JSON, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from melange.api import Buckets, bucket_label
from melange.signals import ipf
from melange.signals.rates import (
    InvalidResponse,
    InvalidValue,
    NoData,
    QueryFailed,
    RateError,
    Scalar,
    parse_vector_response,
    promql_string,
)

PROMPT_METRIC = "vllm[:_]request_prompt_tokens_bucket"
GENERATION_METRIC = "vllm[:_]request_generation_tokens_bucket"
MODEL_LABEL = "model_name"
DIGITS = 6  # decimals kept of each share in status (a share of 1e-6 is one request in a million)
# When the spec's matrix has no mass in a row or column where requests were observed, no fit keeps
# its zeros: the prior is then mixed with the observed marginals' product at this weight.
FILL_WEIGHT = 1e-3

Matrix = list[list[float]]


class DistributionError(RateError):
    """No usable distribution; the `DistributionObserved=False` reason and why."""

    reason = "DistributionUnavailable"


class TooFewRequests(DistributionError):
    reason = "TooFewRequests"


class OutsideBuckets(DistributionError):
    reason = "OutsideBuckets"


# -- queries and answers ------------------------------------------------------------------------


def histogram_query(metric: str, model_name: str, window_seconds: int) -> str:
    """The increase of one of vLLM's token histograms over the window, per `le` bound."""
    selector = f'{{__name__=~"{metric}",{MODEL_LABEL}={promql_string(model_name)}}}'
    return f"sum by (le) (increase({selector}[{window_seconds}s]))"


def queries(model_name: str, window_seconds: int) -> tuple[str, str]:
    """The prompt-length and the generation-length histogram queries."""
    return (
        histogram_query(PROMPT_METRIC, model_name, window_seconds),
        histogram_query(GENERATION_METRIC, model_name, window_seconds),
    )


@dataclass(frozen=True)
class Histogram:
    """A cumulative histogram: increasing `le` bounds (the last `+Inf`) and their counts."""

    bounds: tuple[float, ...]
    cumulative: tuple[float, ...]

    @property
    def total(self) -> float:
        return self.cumulative[-1]


def parse_histogram_response(
    http_status: int,
    body: bytes | str,
    what: str,
    url: str = "Prometheus",
    *,
    content_type: str = "",
) -> Histogram:
    """One histogram out of a `sum by (le)` answer; series whose `le` spell the same bound merge."""
    samples = parse_vector_response(http_status, body, url, content_type=content_type)
    if isinstance(samples, Scalar):
        raise QueryFailed(f"the {what} query returned a scalar; it must return one series per le")
    if not samples:
        raise NoData(
            f"no {what} histogram series: is the model serving and its metrics scraped, and did "
            "it finish requests within the window?"
        )
    counts: dict[float, float] = {}
    for labels, raw in samples:
        le = labels.get("le")
        try:
            bound = float(str(le))  # "+Inf" parses too; a missing le ("None") does not
            value = float(raw)
        except (TypeError, ValueError):
            raise InvalidResponse(
                f"the {what} histogram has a series without a numeric le label or value "
                f"(le={str(le)[:40]!r}, value={str(raw)[:40]!r}); group it by le only: "
                "sum by (le) (...)"
            ) from None
        if math.isnan(bound) or math.isnan(value) or math.isinf(value) or value < 0:
            raise InvalidValue(f"the {what} histogram has le={le} with value {raw}")
        counts[bound] = counts.get(bound, 0.0) + value
    if not math.isinf(max(counts)):
        raise QueryFailed(f'the {what} histogram has no le="+Inf" bucket')
    bounds = tuple(sorted(counts))
    # increase() extrapolates each series separately, so the cumulative counts can dip a little:
    # a bucket never holds fewer requests than a lower one.
    cumulative = tuple(np.maximum.accumulate([counts[b] for b in bounds]).tolist())
    return Histogram(bounds, cumulative)


# -- the observed matrix ------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """The fitted workload matrix (shares summing to 1) and what it was fitted from."""

    matrix: Matrix
    requests: float  # finished requests in the window (the prompt histogram's count)
    outside_input: float  # share of requests whose prompt length is outside the input edges
    outside_output: float  # share whose generation length is outside the output edges
    filled: tuple[str, ...]  # buckets the spec's matrix left empty where requests were observed

    def summary(self, window_seconds: int) -> str:
        text = f"{self.requests:.0f} requests in the last {window_seconds} s"
        outside = max(self.outside_input, self.outside_output)
        if outside >= 0.0005:
            text += (
                f"; {self.outside_input:.1%} of prompts and {self.outside_output:.1%} of outputs "
                "were outside the bucket edges (spread over the buckets in proportion)"
            )
        if self.filled:
            text += "; the spec's matrix had no requests in " + ", ".join(self.filled)
        return text


def _normalised(matrix: Any) -> np.ndarray[Any, np.dtype[np.float64]]:
    array = np.asarray(matrix, dtype=np.float64)
    total = float(array.sum())
    return array / total if total > 0 else array


def _empty_lines(prior: np.ndarray[Any, Any], rows: Any, cols: Any, edges: Any) -> list[str]:
    edges_in, edges_out = edges
    named = [
        f"input {edges_in[i]}-{edges_in[i + 1]} tokens"
        for i in np.flatnonzero((np.asarray(rows) > 0) & (prior.sum(axis=1) == 0))
    ]
    return named + [
        f"output {edges_out[j]}-{edges_out[j + 1]} tokens"
        for j in np.flatnonzero((np.asarray(cols) > 0) & (prior.sum(axis=0) == 0))
    ]


def observe(
    prior: Sequence[Sequence[float]],
    input_edges: Sequence[int],
    output_edges: Sequence[int],
    prompt: Histogram,
    generation: Histogram,
    *,
    min_requests: float = 0.0,
) -> Observation:
    """The matrix with the observed marginals that stays closest to `prior` (the spec's matrix).

    Requests outside the edges are left out of the marginals (the total rate still counts them,
    so their load is spread over the buckets in proportion). Where the prior has no mass in a row
    or column that was observed, no fit keeps its zeros; the prior is then mixed with the product
    of the marginals at a small weight, which fills only what the observation demands.
    """
    if prompt.total < max(min_requests, 0.0) or prompt.total <= 0:
        raise TooFewRequests(
            f"{prompt.total:.0f} requests finished in the window, fewer than minRequests "
            f"({min_requests:g}): too few to estimate the distribution"
        )
    rows = ipf.rebin_histogram(prompt.bounds, prompt.cumulative, input_edges)
    cols = ipf.rebin_histogram(generation.bounds, generation.cumulative, output_edges)
    if rows.counts.sum() <= 0 or cols.counts.sum() <= 0:
        raise OutsideBuckets(
            f"every observed request's {'prompt' if rows.counts.sum() <= 0 else 'output'} "
            "length is outside the bucket edges: the edges do not describe this traffic"
        )
    prior_array = _normalised(prior)
    filled = _empty_lines(prior_array, rows.counts, cols.counts, (input_edges, output_edges))
    start = prior_array
    if filled:
        independent = np.outer(_normalised(rows.counts), _normalised(cols.counts))
        start = (1 - FILL_WEIGHT) * prior_array + FILL_WEIGHT * independent
    try:
        fitted = ipf.fit(start, rows.counts, cols.counts, rescale=True).matrix
    except ipf.NotConvergedError as exc:  # structural zeros: the closest reachable matrix
        fitted = _normalised(exc.result.matrix)
    except ipf.IpfError as exc:
        raise DistributionError(f"cannot fit the distribution: {exc}") from None
    inside_in = float(rows.counts.sum()) / max(prompt.total, 1e-12)
    inside_out = float(cols.counts.sum()) / max(generation.total, 1e-12)
    return Observation(
        matrix=rounded(fitted),
        requests=prompt.total,
        outside_input=max(0.0, 1 - inside_in),
        outside_output=max(0.0, 1 - inside_out),
        filled=tuple(filled),
    )


def rounded(matrix: Any) -> Matrix:
    """Shares to `DIGITS` decimals, as stored in status (and compared after a restart)."""
    return [[round(float(v), DIGITS) for v in row] for row in _normalised(matrix)]


# -- drift --------------------------------------------------------------------------------------


def distance(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> float:
    """Total variation distance between two matrices as distributions: 0 same shape, 1 disjoint."""
    left, right = _normalised(a), _normalised(b)
    if left.shape != right.shape:
        return 1.0
    return float(0.5 * np.abs(left - right).sum())


@dataclass(frozen=True)
class Drift:
    distance: float
    resolve: bool
    message: str


def drift(
    solved: Sequence[Sequence[float]], observed: Sequence[Sequence[float]], tolerance: float
) -> Drift:
    """Re-solve when the observed matrix moved more than `tolerance` from the solved one.

    No separate stabilisation: the matrix is already an average over the whole window, and after a
    re-solve the next one needs another full `tolerance` of movement.
    """
    moved = distance(solved, observed)
    if moved > tolerance:
        return Drift(
            moved,
            True,
            f"{moved:.1%} of requests moved between buckets against the distribution the plan "
            f"was solved for (tolerance {tolerance:.1%}): re-solved for the observed one",
        )
    return Drift(moved, False, f"the distribution moved {moved:.1%}: within tolerance")


def fitting(matrix: Any, buckets: Buckets) -> Matrix | None:
    """`matrix` when it is a matrix of numbers with one row per input bucket and one column per
    output bucket, else None (e.g. one fitted before the spec's edges changed)."""
    rows, cols = len(buckets.input_tokens) - 1, len(buckets.output_tokens) - 1
    if (
        isinstance(matrix, list)
        and len(matrix) == rows
        and all(isinstance(r, list) and len(r) == cols for r in matrix)
        and all(isinstance(v, int | float) and not isinstance(v, bool) for r in matrix for v in r)
    ):
        return [[float(v) for v in row] for row in matrix]
    return None


def describe_largest_moves(
    solved: Sequence[Sequence[float]],
    observed: Sequence[Sequence[float]],
    edges: tuple[Sequence[int], Sequence[int]],
    limit: int = 2,
) -> str:
    """The buckets that gained or lost the most, for an Event a person reads."""
    delta = _normalised(observed) - _normalised(solved)
    order = np.argsort(-np.abs(delta), axis=None)[:limit]
    parts = []
    for flat in order:
        i, j = np.unravel_index(int(flat), delta.shape)
        if abs(delta[i, j]) < 0.0005:
            break
        parts.append(f"{bucket_label(*edges, int(i), int(j))} {delta[i, j]:+.1%}")
    return "; ".join(parts)


def observation_status(observation: Observation, moved: float) -> dict[str, Any]:
    """The status fields of one observation: the fitted shares and their distance from the plan's."""
    return {
        "observedDistribution": observation.matrix,
        "distributionDistance": round(moved, DIGITS),
    }


DISTRIBUTION_STATUS_FIELDS = ("observedDistribution", "distributionDistance", "solvedDistribution")


def cleared_status(status: Mapping[str, Any]) -> dict[str, Any]:
    """The distribution fields to delete (merge-patch nulls) once the spec does not follow it."""
    return {key: None for key in DISTRIBUTION_STATUS_FIELDS if status.get(key) is not None}
