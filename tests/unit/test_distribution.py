"""The live distribution: histogram queries and answers, the fitted matrix, and the drift rule."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pytest

from melange import api
from melange.controller import decide
from melange.signals import distribution
from melange.signals.distribution import Histogram, OutsideBuckets, TooFewRequests
from melange.signals.rates import InvalidResponse, NoData, QueryFailed
from tests.specs import with_value

EDGES_IN = [1, 100, 1000]
EDGES_OUT = [1, 50, 500]


def answer(series: dict[str, float]) -> str:
    return json.dumps(
        {
            "status": "success",
            "data": {
                "resultType": "vector",
                "result": [
                    {"metric": {"le": le}, "value": [1700000000, str(value)]}
                    for le, value in series.items()
                ],
            },
        }
    )


def test_histogram_query_selects_both_spellings_and_the_model() -> None:
    prompt, generation = distribution.queries('llama "8b"', 600)
    assert prompt == (
        'sum by (le) (increase({__name__=~"vllm[:_]request_prompt_tokens_bucket",'
        'model_name="llama \\"8b\\""}[600s]))'
    )
    assert "request_generation_tokens_bucket" in generation


def test_parse_merges_spellings_of_a_bound_and_sorts() -> None:
    body = answer({"+Inf": 10, "100.0": 7, "10": 2, "100": 1})
    histogram = distribution.parse_histogram_response(200, body, "prompt-tokens")
    assert histogram.bounds == (10.0, 100.0, float("inf"))
    assert histogram.cumulative == (2.0, 8.0, 10.0)


def test_parse_repairs_extrapolation_dips() -> None:
    """increase() extrapolates each bucket on its own, so a higher bucket can read a bit lower."""
    body = answer({"10": 5.02, "100": 5.0, "+Inf": 9.0})
    histogram = distribution.parse_histogram_response(200, body, "prompt-tokens")
    assert histogram.cumulative == (5.02, 5.02, 9.0)


@pytest.mark.parametrize(
    ("body", "error", "words"),
    [
        (answer({}), NoData, "no prompt-tokens histogram series"),
        (answer({"10": 1, "100": 2}), QueryFailed, 'no le="+Inf"'),
        (
            json.dumps(
                {
                    "status": "success",
                    "data": {"resultType": "vector", "result": [{"metric": {}, "value": [0, "1"]}]},
                }
            ),
            InvalidResponse,
            "sum by (le)",
        ),
        (
            json.dumps({"status": "success", "data": {"resultType": "scalar", "result": [0, "1"]}}),
            QueryFailed,
            "scalar",
        ),
    ],
)
def test_parse_errors_say_what_is_wrong(body: str, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=re.escape(words)):
        distribution.parse_histogram_response(200, body, "prompt-tokens")


def histogram(counts: list[float], bounds: list[float]) -> Histogram:
    """A cumulative histogram from per-bucket counts (the last bound +Inf)."""
    return Histogram(tuple(bounds), tuple(np.cumsum(counts).tolist()))


# Bounds that coincide with the edges minus one: le=99 holds 1..99, exactly input bucket [1, 100).
PROMPT = histogram([30, 70, 0], [99, 999, float("inf")])
GENERATION = histogram([60, 40, 0], [49, 499, float("inf")])


def test_observe_matches_the_marginals_and_keeps_the_prior_shape() -> None:
    prior = [[4, 1], [1, 4]]
    observed = distribution.observe(prior, EDGES_IN, EDGES_OUT, PROMPT, GENERATION)
    matrix = np.asarray(observed.matrix)
    np.testing.assert_allclose(matrix.sum(axis=1), [0.3, 0.7], atol=2e-6)
    np.testing.assert_allclose(matrix.sum(axis=0), [0.6, 0.4], atol=2e-6)
    # the prior's association survives: the diagonal stays heavier than independence would give
    assert matrix[0, 0] > 0.3 * 0.6
    assert observed.requests == 100
    assert observed.outside_input == observed.outside_output == 0
    assert observed.filled == ()


def test_observe_returns_the_prior_when_it_already_fits() -> None:
    prior = [[0.18, 0.12], [0.42, 0.28]]  # rows 0.3/0.7, columns 0.6/0.4
    observed = distribution.observe(prior, EDGES_IN, EDGES_OUT, PROMPT, GENERATION)
    assert observed.matrix == [[0.18, 0.12], [0.42, 0.28]]


def test_observe_keeps_zero_cells_zero() -> None:
    prior = [[1, 0], [1, 1]]
    observed = distribution.observe(prior, EDGES_IN, EDGES_OUT, PROMPT, GENERATION)
    assert observed.matrix[0][1] == 0
    np.testing.assert_allclose(np.asarray(observed.matrix).sum(axis=1), [0.3, 0.7], atol=2e-6)


def test_observe_fills_a_row_the_spec_left_empty_and_says_so() -> None:
    prior = [[1, 1], [0, 0]]  # the spec expects no long prompts; 70% were observed
    observed = distribution.observe(prior, EDGES_IN, EDGES_OUT, PROMPT, GENERATION)
    matrix = np.asarray(observed.matrix)
    np.testing.assert_allclose(matrix.sum(axis=1), [0.3, 0.7], atol=2e-6)
    assert observed.filled == ("input 100-1000 tokens",)
    assert "no requests in input 100-1000 tokens" in observed.summary(600)


def test_observe_reports_requests_outside_the_edges() -> None:
    prompt = histogram([30, 60, 10], [99, 999, float("inf")])  # 10 beyond the last edge
    observed = distribution.observe([[1, 1], [1, 1]], EDGES_IN, EDGES_OUT, prompt, GENERATION)
    assert observed.outside_input == pytest.approx(0.1)
    np.testing.assert_allclose(np.asarray(observed.matrix).sum(axis=1), [1 / 3, 2 / 3], atol=2e-6)
    assert "10.0% of prompts" in observed.summary(600)


def test_observe_refuses_too_few_requests() -> None:
    with pytest.raises(TooFewRequests, match="100 requests finished in the window, fewer than"):
        distribution.observe(
            [[1, 1], [1, 1]], EDGES_IN, EDGES_OUT, PROMPT, GENERATION, min_requests=500
        )


def test_observe_refuses_traffic_the_edges_do_not_describe() -> None:
    beyond = histogram([0, 0, 100], [99, 999, float("inf")])
    with pytest.raises(OutsideBuckets, match="prompt length is outside the bucket edges"):
        distribution.observe([[1, 1], [1, 1]], EDGES_IN, EDGES_OUT, beyond, GENERATION)


def test_distance_is_total_variation() -> None:
    assert distribution.distance([[1, 1]], [[2, 2]]) == 0
    assert distribution.distance([[1, 0]], [[0, 1]]) == 1
    assert distribution.distance([[3, 1]], [[1, 1]]) == pytest.approx(0.25)
    assert distribution.distance([[1]], [[1, 1]]) == 1  # another shape: nothing carries over


def test_drift_resolves_only_beyond_the_tolerance() -> None:
    kept = distribution.drift([[3, 1]], [[1, 1]], tolerance=0.25)
    assert not kept.resolve
    assert kept.distance == pytest.approx(0.25)
    moved = distribution.drift([[3, 1]], [[1, 1]], tolerance=0.2)
    assert moved.resolve
    assert "25.0% of requests moved between buckets" in moved.message


def test_largest_moves_name_buckets_by_tokens() -> None:
    text = distribution.describe_largest_moves(
        [[0.5, 0.5], [0, 0]], [[0.2, 0.5], [0.3, 0]], (EDGES_IN, EDGES_OUT)
    )
    assert (
        text == "input 1-100, output 1-50 tokens -30.0%; input 100-1000, output 1-50 tokens +30.0%"
    )


def spec_with(**changes: Any) -> api.AllocationSpec:
    raw: dict[str, Any] = {
        "buckets": {"inputTokens": EDGES_IN, "outputTokens": EDGES_OUT},
        "workload": {"distribution": [[1, 1], [1, 1]], "totalRate": 1},
        "gpus": [{"name": "L4", "costPerHour": 1, "throughput": [[1, 1], [1, 1]]}],
    }
    for path, value in changes.items():
        raw = with_value(raw, path.replace("__", "."), value)
    return api.validate_spec(raw)


def test_following_needs_a_rate_source_and_a_model() -> None:
    with pytest.raises(api.SpecError) as no_source:
        spec_with(workload__fromPrometheus={})
    assert str(no_source.value.errors[0]).startswith(
        "spec.workload.fromPrometheus: needs spec.rateSource"
    )
    with pytest.raises(api.SpecError) as no_model:
        spec_with(
            workload__fromPrometheus={},
            rateSource={"prometheus": {"url": "http://p:9090", "query": "sum(x)"}},
        )
    assert [e.path for e in no_model.value.errors] == ["spec.workload.fromPrometheus.modelName"]
    own_model = spec_with(
        workload__fromPrometheus={"modelName": "m"},
        rateSource={"prometheus": {"url": "http://p:9090", "query": "sum(x)"}},
    )
    assert decide.distribution_model(own_model) == "m"
    inherited = spec_with(
        workload__fromPrometheus={},
        rateSource={"prometheus": {"url": "http://p:9090", "modelName": "llama"}},
    )
    assert decide.distribution_model(inherited) == "llama"
    follow = inherited.workload.from_prometheus
    assert follow is not None
    assert (follow.window_seconds, follow.drift_tolerance, follow.min_requests) == (3600, 0.1, 100)


def test_from_prometheus_fields_are_checked() -> None:
    with pytest.raises(api.SpecError) as caught:
        spec_with(workload__fromPrometheus={"windowSeconds": 5, "driftTolerance": 0, "x": 1})
    assert [str(e) for e in caught.value.errors] == [
        "spec.workload.fromPrometheus.windowSeconds: must be >= 10, got 5",
        "spec.workload.fromPrometheus.driftTolerance: must be > 0, got 0",
        "spec.workload.fromPrometheus.x: is not a known field",
        "spec.workload.fromPrometheus: needs spec.rateSource (its Prometheus, credentials and "
        "interval are used)",
    ]
