"""The live rate: the drift decision, reading Prometheus' answers, the default query, the client."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from melange import api
from melange.api.conditions import RATE_OBSERVED, Condition
from melange.controller import decide
from melange.signals import rates
from melange.signals.prometheus import PrometheusClient
from melange.signals.rates import RateSample
from tests.e2e.prometheus import self_signed_certificate

T = TypeVar("T")
T0 = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)  # a run of observations that spans any window


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def history(*points: tuple[float, float]) -> list[RateSample]:
    return [RateSample(at(t), r) for t, r in points]


# -- the decision, table-driven --------------------------------------------------------------------

DECISIONS = [
    # (id, history, observed, solved, tolerance, window, first, expected rate or None)
    ("within tolerance", [], 10.5, 10.0, 0.1, 300, False, None),
    ("up exactly at the tolerance edge is kept", [], 15.0, 10.0, 0.5, 300, False, None),
    ("up just past the edge re-solves at once", [], 15.01, 10.0, 0.5, 300, False, 15.01),
    ("up re-solves for the observed rate", [(-10, 10.0)], 20.0, 10.0, 0.1, 300, False, 20.0),
    ("down exactly at the edge is kept", [], 5.0, 10.0, 0.5, 300, False, None),
    ("down past the edge with an empty window", [], 4.9, 10.0, 0.5, 300, False, 4.9),
    ("down held by a high rate in the window", [(-100, 10.0)], 4.0, 10.0, 0.1, 300, False, None),
    ("down only to the window's highest rate", [(-100, 8.0)], 4.0, 10.0, 0.1, 300, False, 8.0),
    ("window highest within tolerance keeps", [(-100, 9.0)], 4.0, 10.0, 0.1, 300, False, None),
    ("a sample exactly window-old is out", [(-300, 10.0)], 4.0, 10.0, 0.1, 300, False, 4.0),
    ("a sample just inside the window counts", [(-299, 10.0)], 4.0, 10.0, 0.1, 300, False, None),
    ("window 0 follows the observation", [(-1, 10.0)], 4.0, 10.0, 0.1, 0, False, 4.0),
    ("first observation holds the solved rate", [], 4.0, 10.0, 0.1, 300, True, None),
    ("first observation still scales up", [], 20.0, 10.0, 0.1, 300, True, 20.0),
    ("first observation, window 0", [], 4.0, 10.0, 0.1, 0, True, 4.0),
    ("no plan yet solves for the observation", [], 7.0, None, 0.1, 300, False, 7.0),
    ("zero to zero keeps", [], 0.0, 0.0, 0.1, 300, False, None),
    ("any rate above zero re-solves up", [], 0.01, 0.0, 0.1, 300, False, 0.01),
    ("real zero traffic scales down", [], 0.0, 10.0, 0.1, 300, False, 0.0),
    ("tolerance 0: any increase", [], 10.001, 10.0, 0.0, 300, False, 10.001),
    ("tolerance 0: any decrease", [], 9.999, 10.0, 0.0, 300, False, 9.999),
    ("tolerance >= 1 never scales down", [], 0.0, 10.0, 1.0, 0, False, None),
]


@pytest.mark.parametrize(
    ("points", "observed", "solved", "tolerance", "window", "first", "expected"),
    [case[1:] for case in DECISIONS],
    ids=[case[0] for case in DECISIONS],
)
def test_decide(
    points: list[tuple[float, float]],
    observed: float,
    solved: float | None,
    tolerance: float,
    window: float,
    first: bool,
    expected: float | None,
) -> None:
    decision = rates.decide(
        history(*points),
        observed,
        solved,
        tolerance=tolerance,
        window_seconds=window,
        now=T0,
        first_observation=first,
        observed_since=LONG_AGO,
    )
    assert decision.rate == expected
    assert decision.resolve == (expected is not None)


def test_missing_data_keeps_the_plan_and_the_window() -> None:
    window = history((-400, 50.0), (-100, 20.0))
    decision = rates.decide(window, None, 30.0, tolerance=0.1, window_seconds=300, now=T0)
    assert not decision.resolve
    assert decision.history == tuple(window)  # no run of observations has refilled the window
    assert "plan kept" in decision.message
    refilled = rates.decide(
        window, None, 30.0, tolerance=0.1, window_seconds=300, now=T0, observed_since=LONG_AGO
    )
    assert refilled.history == (RateSample(at(-100), 20.0),)


def test_the_window_peak_survives_an_outage_until_refilled() -> None:
    """40 req/s, then 45 s without an answer, then reads that start low (a range that begins in the
    gap): with a 30 s window, the 40 seen before the gap holds the plan until 30 s of consecutive
    observations have refilled the window, and by then they read 40 again."""
    solved, window = 40.0, list[RateSample]()
    since: datetime | None = at(-100)
    for t in range(-100, 5, 5):
        decision = rates.decide(
            window, 40.0, solved, tolerance=0.1, window_seconds=30, now=at(t), observed_since=since
        )
        window = list(decision.history)
    before_outage = list(window)
    since = None  # the outage, t = 0 .. 45
    reads = {45: 9.05, 50: 14.4, 55: 18.6, 60: 25.0, 65: 32.0, 70: 38.0, 75: 40.0, 80: 40.0}
    for t, observed in reads.items():
        since = since or at(t)
        decision = rates.decide(
            window,
            observed,
            solved,
            tolerance=0.1,
            window_seconds=30,
            now=at(t),
            observed_since=since,
        )
        assert not decision.resolve, (t, decision.message)
        window = list(decision.history)
    # Had the outage emptied the window, the first read after it would have scaled down.
    emptied = rates.decide(
        before_outage,
        9.05,
        solved,
        tolerance=0.1,
        window_seconds=30,
        now=at(45),
        observed_since=LONG_AGO,
    )
    assert emptied.rate == 9.05


def test_messages_say_what_and_why() -> None:
    up = rates.decide([], 20.0, 10.0, tolerance=0.1, window_seconds=60, now=T0)
    assert up.message == (
        "observed 20 req/s, +100% against the 10 req/s the plan was solved for (tolerance 10%): "
        "re-solved for 20 req/s"
    )
    down = rates.decide(history((-30, 6.0)), 4.0, 10.0, tolerance=0.1, window_seconds=60, now=T0)
    assert down.message == (
        "the highest rate in the last 60 s is 6 req/s, -40% against the 10 req/s the plan was "
        "solved for (tolerance 10%): re-solved for 6 req/s"
    )


def test_rejects_an_invalid_observation() -> None:
    with pytest.raises(ValueError, match="finite"):
        rates.decide([], float("nan"), 1.0, tolerance=0.1, window_seconds=1, now=T0)


def test_window_keeps_only_what_can_still_be_its_highest() -> None:
    decision = rates.decide(
        history((-50, 5.0), (-40, 9.0), (-30, 7.0), (-20, 7.0), (-10, 3.0)),
        4.0,
        9.0,
        tolerance=0.5,
        window_seconds=300,
        now=T0,
    )
    # 5 is followed by 9, the first 7 by an equal 7, 3 by 4: none of them can be the maximum again.
    assert decision.history == (
        RateSample(at(-40), 9.0),
        RateSample(at(-20), 7.0),
        RateSample(at(0), 4.0),
    )


def test_compaction_past_the_cap_delays_but_never_hastens_a_scale_down() -> None:
    points = [(-100 + k, 100.0 - k) for k in range(10)]  # strictly decreasing: nothing dominated
    decision = rates.decide(
        history(*points), 1.0, 100.0, tolerance=0.5, window_seconds=300, now=T0, max_items=4
    )
    assert len(decision.history) == 4
    assert decision.history[0].rate == 100.0  # the highest rate survives ...
    assert decision.history[0].time > at(-100)  # ... and stays a little longer, never shorter
    assert decision.history[-1] == RateSample(T0, 1.0)


def _step_down_with_restart(keep_status: bool) -> dict[int, float | None]:
    """68 req/s until t=0, then 34; the operator restarts at t=100 (observing again at once, so
    its run of observations goes on, as `status.observedSince` tells it)."""
    solved, state, decisions = 68.0, list[RateSample](), {}
    since: datetime | None = at(-60)
    for t in range(-60, 400, 10):
        if t == 100:  # the in-memory window is gone; the status is what remains
            stored = json.loads(json.dumps(rates.history_to_status(state))) if keep_status else []
            state = rates.history_from_status(stored)
            since = since if keep_status else at(t)
        decision = rates.decide(
            state,
            68.0 if t < 0 else 34.0,
            solved,
            tolerance=0.1,
            window_seconds=300,
            now=at(t),
            observed_since=since,
        )
        state, decisions[t] = list(decision.history), decision.rate
        solved = decision.rate if decision.rate is not None else solved
    return decisions


def test_stabilisation_window_survives_a_restart() -> None:
    decisions = _step_down_with_restart(keep_status=True)
    # The last 68 was seen at t=-10: it leaves the 300 s window at t=290, not before.
    assert {t: r for t, r in decisions.items() if r is not None} == {290: 34.0}
    # Without the history in the status, the restarted operator would scale down at once.
    lost = _step_down_with_restart(keep_status=False)
    assert {t: r for t, r in lost.items() if r is not None} == {100: 34.0}


def test_history_status_round_trip_skips_malformed_entries() -> None:
    raw = [
        {"time": "2026-03-04T05:06:07Z", "rate": 3},
        {"time": "not a time", "rate": 1.0},
        {"time": "2026-03-04T05:06:00Z", "rate": "7"},
        {"time": "2026-03-04T05:06:00Z", "rate": -1.0},
        "garbage",
        {"time": "2026-03-04T05:05:07+00:00", "rate": 5.5},
    ]
    samples = rates.history_from_status(raw)
    assert samples == [RateSample(at(-60), 5.5), RateSample(T0, 3.0)]
    assert rates.history_to_status(samples) == [
        {"time": "2026-03-04T05:05:07Z", "rate": 5.5},
        {"time": "2026-03-04T05:06:07Z", "rate": 3.0},
    ]
    assert rates.history_from_status(None) == []


# -- the decision, properties ----------------------------------------------------------------------

steps = st.lists(
    st.tuples(st.integers(min_value=0, max_value=120), st.floats(min_value=0, max_value=1)),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    solved=st.floats(min_value=0.01, max_value=1e4),
    tolerance=st.floats(min_value=0.0, max_value=0.99),
    window=st.integers(min_value=0, max_value=600),
    first=st.booleans(),
    restarts=st.sets(st.integers(min_value=0, max_value=59)),
    sequence=steps,
)
def test_a_rate_within_tolerance_never_re_solves(
    solved: float,
    tolerance: float,
    window: int,
    first: bool,
    restarts: set[int],
    sequence: list[tuple[int, float]],
) -> None:
    low, high = 1 - tolerance, 1 + tolerance
    state: list[RateSample] = []
    now = T0
    for k, (gap, u) in enumerate(sequence):
        now += timedelta(seconds=gap)
        factor = min(max(low + u * (high - low), low), high)
        if k in restarts:
            state = rates.history_from_status(rates.history_to_status(state))
        decision = rates.decide(
            state,
            solved * factor,
            solved,
            tolerance=tolerance,
            window_seconds=window,
            now=now,
            first_observation=first and k == 0,
        )
        assert not decision.resolve, decision.message
        state = list(decision.history)


@settings(max_examples=300, deadline=None)
@given(
    tolerance=st.floats(min_value=0.0, max_value=0.5),
    window=st.integers(min_value=0, max_value=300),
    sequence=st.lists(
        st.tuples(st.integers(min_value=1, max_value=60), st.floats(min_value=0, max_value=100)),
        min_size=1,
        max_size=80,
    ),
)
def test_never_scales_below_a_rate_seen_in_the_window(
    tolerance: float, window: int, sequence: list[tuple[int, float]]
) -> None:
    state: list[RateSample] = []
    seen: list[RateSample] = []
    solved: float | None = None
    now = T0
    for gap, observed in sequence:
        now += timedelta(seconds=gap)
        seen.append(RateSample(now, observed))
        decision = rates.decide(
            state,
            observed,
            solved,
            tolerance=tolerance,
            window_seconds=window,
            now=now,
            observed_since=T0,
        )
        in_window = [s.rate for s in seen if s.time > now - timedelta(seconds=window)]
        in_window.append(observed)
        if decision.rate is not None:
            assert decision.rate == max(in_window) or decision.rate == observed
            assert decision.rate >= observed
        # the compacted window always knows the true maximum
        assert max(s.rate for s in decision.history) == max(in_window)
        times = [s.time for s in decision.history]
        assert times == sorted(times)
        assert len(decision.history) <= rates.MAX_HISTORY
        state = list(decision.history)
        if decision.rate is not None:
            solved = decision.rate


@settings(max_examples=300, deadline=None)
@given(
    tolerance=st.floats(min_value=0.0, max_value=0.5),
    window=st.integers(min_value=1, max_value=300),
    before=st.lists(
        st.tuples(st.integers(min_value=1, max_value=60), st.floats(min_value=0, max_value=100)),
        min_size=1,
        max_size=30,
    ),
    outage=st.integers(min_value=1, max_value=3600),
    after=st.lists(
        st.tuples(st.integers(min_value=1, max_value=60), st.floats(min_value=0, max_value=100)),
        min_size=1,
        max_size=30,
    ),
)
def test_an_outage_never_lowers_the_window_peak_before_it_is_refilled(
    tolerance: float,
    window: int,
    before: list[tuple[int, float]],
    outage: int,
    after: list[tuple[int, float]],
) -> None:
    state: list[RateSample] = []
    solved: float | None = None
    now, since = T0, T0
    for gap, observed in before:
        now += timedelta(seconds=gap)
        decision = rates.decide(
            state,
            observed,
            solved,
            tolerance=tolerance,
            window_seconds=window,
            now=now,
            observed_since=since,
        )
        state = list(decision.history)
        solved = decision.rate if decision.rate is not None else solved
    peak_before = max(s.rate for s in state)
    now += timedelta(seconds=outage)
    since = now  # the first observation after the outage starts a new run
    for gap, observed in after:
        decision = rates.decide(
            state,
            observed,
            solved,
            tolerance=tolerance,
            window_seconds=window,
            now=now,
            observed_since=since,
        )
        if now - since < timedelta(seconds=window):  # not yet refilled
            assert max(s.rate for s in decision.history) >= peak_before
            if decision.rate is not None and solved is not None and decision.rate < solved:
                assert decision.rate >= peak_before
        state = list(decision.history)
        solved = decision.rate if decision.rate is not None else solved
        now += timedelta(seconds=gap)


# -- reading Prometheus' answer ----------------------------------------------------------------


def vector(*values: str, metric: dict[str, str] | None = None) -> str:
    return json.dumps(
        {
            "status": "success",
            "data": {
                "resultType": "vector",
                "result": [
                    {"metric": metric or {"job": f"j{k}"}, "value": [1712345678.1, v]}
                    for k, v in enumerate(values)
                ],
            },
        }
    )


def test_parses_one_series_and_a_scalar() -> None:
    assert rates.parse_query_response(200, vector("34.5", metric={})) == 34.5
    assert rates.parse_query_response(200, vector("0")) == 0.0
    scalar = {"status": "success", "data": {"resultType": "scalar", "result": [1.0, "2.5"]}}
    assert rates.parse_query_response(200, json.dumps(scalar).encode()) == 2.5


PARSE_ERRORS = [
    ("empty", 200, vector(), rates.NoData, "returned no series, so the rate is unknown"),
    (
        "two series",
        200,
        vector("1", "2"),
        rates.QueryFailed,
        'returned 2 series ({job="j0"}, {job="j1"}); it must return one: aggregate it',
    ),
    ("NaN", 200, vector("NaN"), rates.InvalidValue, "is NaN"),
    ("+Inf", 200, vector("+Inf"), rates.InvalidValue, "is +Inf, not a rate"),
    ("-Inf", 200, vector("-Inf"), rates.InvalidValue, "is -Inf, not a rate"),
    ("negative", 200, vector("-3"), rates.InvalidValue, "is -3; a request rate cannot be negative"),
    ("not a number", 200, vector("fast"), rates.InvalidResponse, "value is not a number"),
    (
        "bad query",
        400,
        json.dumps(
            {
                "status": "error",
                "errorType": "bad_data",
                "error": 'invalid parameter "query": 1:5: parse error: unexpected "}"',
            }
        ),
        rates.QueryFailed,
        'Prometheus: bad_data: invalid parameter "query": 1:5: parse error: unexpected "}" (HTTP 400)',
    ),
    (
        "query timeout",
        503,
        json.dumps({"status": "error", "errorType": "timeout", "error": "query timed out"}),
        rates.PrometheusUnavailable,
        "Prometheus: timeout: query timed out (HTTP 503)",
    ),
    (
        "proxy 502",
        502,
        "<html>Bad Gateway</html>",
        rates.PrometheusUnavailable,
        "is not Prometheus API JSON (HTTP 502, no content type, 24 bytes)",
    ),
    (
        "unauthorized",
        401,
        "Unauthorized\n",
        rates.QueryFailed,
        "(HTTP 401, no content type, 13 bytes; is the url Prometheus' base URL",
    ),
    ("garbage", 200, "# HELP up\nup 1\n", rates.InvalidResponse, "is not Prometheus API JSON"),
    ("empty body", 200, "", rates.InvalidResponse, "(HTTP 200, no content type, 0 bytes)"),
    (
        "matrix",
        200,
        json.dumps({"status": "success", "data": {"resultType": "matrix", "result": []}}),
        rates.QueryFailed,
        "returned a range vector (matrix)",
    ),
    (
        "no data",
        200,
        json.dumps({"status": "success"}),
        rates.InvalidResponse,
        "has no data",
    ),
    (
        "malformed sample",
        200,
        json.dumps(
            {"status": "success", "data": {"resultType": "vector", "result": [{"value": 3}]}}
        ),
        rates.InvalidResponse,
        "malformed sample",
    ),
]


@pytest.mark.parametrize(
    ("status", "body", "error", "message"),
    [case[1:] for case in PARSE_ERRORS],
    ids=[case[0] for case in PARSE_ERRORS],
)
def test_parse_errors_name_the_problem(
    status: int, body: str, error: type[rates.RateError], message: str
) -> None:
    with pytest.raises(error) as info:
        rates.parse_query_response(status, body, "http://prom/api/v1/query")
    assert message in info.value.message
    assert info.value.reason == error.reason


@pytest.mark.parametrize("status", [200, 302, 401, 404, 500, 502])
@pytest.mark.parametrize(
    "body",
    [
        "<html><body>internal admin page: MARKER-1234</body></html>",
        '{"MARKER-1234": true}',
        json.dumps({"status": "success", "data": "MARKER-1234"}),
        json.dumps({"status": "success", "data": {"resultType": "MARKER-1234", "result": []}}),
        json.dumps(
            {"status": "success", "data": {"resultType": "scalar", "result": "MARKER-1234"}}
        ),
        json.dumps(
            {"status": "success", "data": {"resultType": "vector", "result": "MARKER-1234"}}
        ),
        json.dumps(
            {"status": "success", "data": {"resultType": "vector", "result": ["MARKER-1234"]}}
        ),
        vector("MARKER-1234"),
    ],
)
def test_no_part_of_an_answer_body_is_quoted(status: int, body: str) -> None:
    """Only Prometheus' own errorType and error fields are quoted: the url may point at a page
    that is not Prometheus, and the message ends up in a status others can read."""
    with pytest.raises(rates.RateError) as info:
        rates.parse_query_response(status, body, "http://prom/api/v1/query")
    assert "MARKER" not in info.value.message


def test_a_non_prometheus_answer_is_described_by_status_type_and_size() -> None:
    body = "<html>" + "x" * 5111 + "</html>"
    with pytest.raises(rates.InvalidResponse) as info:
        rates.parse_query_response(
            200, body, "http://p/api/v1/query", content_type="text/html; charset=utf-8"
        )
    assert info.value.message == (
        "the answer from http://p/api/v1/query is not Prometheus API JSON "
        "(HTTP 200, text/html, 5124 bytes)"
    )


def test_prometheus_errors_are_one_short_printable_line() -> None:
    error = "bad\x1b[31m thing\r\nX-Injected: 1\x00" + "y" * 500
    body = json.dumps({"status": "error", "errorType": "bad_data\n", "error": error})
    with pytest.raises(rates.QueryFailed) as info:
        rates.parse_query_response(400, body)
    message = info.value.message
    assert message.startswith("Prometheus: bad_data: bad [31m thing X-Injected: 1 yyy")
    assert message.endswith("... (HTTP 400)")
    assert all(c.isprintable() for c in message)
    assert len(message) < 260


def test_many_series_are_listed_briefly() -> None:
    with pytest.raises(rates.QueryFailed, match=r"returned 5 series .* and 2 more\)"):
        rates.parse_query_response(200, vector("1", "1", "1", "1", "1"))


# -- the default query -------------------------------------------------------------------------


def test_default_query() -> None:
    assert rates.default_query("llama-3.1-8b") == (
        'sum(rate({__name__=~"vllm[:_]request_success_total",model_name="llama-3.1-8b"}[120s]))'
    )
    assert rates.default_query('we"ird\\name', 30).endswith('model_name="we\\"ird\\\\name"}[30s]))')


@pytest.mark.parametrize(
    ("name", "matches"),
    [
        ("vllm:request_success_total", True),
        ("vllm_request_success_total", True),
        ("vllm:request_success_created", False),
        ("xvllm:request_success_total", False),
    ],
)
def test_default_query_matches_both_spellings(name: str, matches: bool) -> None:
    # PromQL regular expressions are fully anchored, as re.fullmatch.
    assert bool(re.fullmatch(rates.REQUEST_SUCCESS_METRIC, name)) == matches


def _spec(**prometheus: Any) -> api.AllocationSpec:
    return api.validate_spec(
        {
            "buckets": {"inputTokens": [1, 10], "outputTokens": [1, 10]},
            "workload": {"distribution": [[1]], "totalRate": 1},
            "gpus": [
                {
                    "name": "L4",
                    "costPerHour": 1,
                    "throughput": [[1]],
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                }
            ],
            "rateSource": {"prometheus": {"url": "http://prom:9090", **prometheus}},
        }
    )


def test_rate_source_needs_exactly_one_of_query_and_model() -> None:
    def errors(**prometheus: Any) -> list[str]:
        with pytest.raises(api.SpecError) as caught:
            _spec(**prometheus)
        return [str(e) for e in caught.value.errors]

    assert errors() == ["spec.rateSource.prometheus: set exactly one of query and modelName"]
    assert errors(query="up", modelName="m") == [
        "spec.rateSource.prometheus: set exactly one of query and modelName"
    ]
    assert errors(query="up", rangeSeconds=60) == [
        "spec.rateSource.prometheus.rangeSeconds: applies to the default query, which needs "
        "modelName"
    ]
    assert api.resource_errors(_spec(modelName="m", rangeSeconds=60)) == []


def test_rate_query_and_timeout() -> None:
    source = _spec(modelName="m", rangeSeconds=8).rate_source
    assert source is not None
    assert decide.rate_query(source) == rates.default_query("m", 8)
    assert decide.query_timeout(source) == 10
    custom = _spec(query="sum(rate(x[1m]))").rate_source
    assert custom is not None
    assert decide.rate_query(custom) == "sum(rate(x[1m]))"


def test_rate_conditions() -> None:
    failed = decide.rate_failed(rates.NoData("the query returned no series"))
    assert (failed.status, failed.reason) == ("False", "NoData")
    assert failed.message == (
        "the query returned no series; the current plan and node pools are kept"
    )
    ok = decide.rate_observed(34.25, "http://prom:9090")
    assert (ok.status, ok.reason, ok.message) == (
        "True",
        "Observed",
        "34.25 req/s from http://prom:9090",
    )
    assert decide.cleared_rate_status({"observedRate": 3, "solvedRate": 3}) == {
        "observedRate": None
    }


# -- the client, against local HTTP servers ----------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serving(
    handler: Handler, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def run(scenario: Callable[[PrometheusClient], Awaitable[T]]) -> T:
    async def main() -> T:
        client = PrometheusClient()
        try:
            return await scenario(client)
        finally:
            await client.close()

    return asyncio.run(main())


def test_client_sends_query_and_token_and_reads_the_rate() -> None:
    seen: list[web.Request] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request)
        return web.Response(text=vector("12.5", metric={}), content_type="application/json")

    async def scenario(client: PrometheusClient) -> float:
        async with serving(handler) as url:
            return await client.query_rate(url + "/prefix/", "sum(up)", bearer_token="s3cret")

    assert run(scenario) == 12.5
    assert seen[0].path == "/prefix/api/v1/query"
    assert seen[0].query["query"] == "sum(up)"
    assert seen[0].query["timeout"] == "9500ms"  # Prometheus durations are integers
    assert seen[0].headers["Authorization"] == "Bearer s3cret"


def test_client_reports_a_refused_connection() -> None:
    async def scenario(client: PrometheusClient) -> None:
        await client.query_rate("http://127.0.0.1:9", "up", timeout=2)

    with pytest.raises(
        rates.PrometheusUnavailable, match=r"cannot connect to 127.0.0.1:9: Connection refused$"
    ):
        run(scenario)


def test_client_times_out() -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late")

    async def scenario(client: PrometheusClient) -> None:
        async with serving(slow) as url:
            await client.query_rate(url, "up", timeout=0.3)

    with pytest.raises(rates.PrometheusUnavailable, match=r"within 0.3 s \(timed out\)"):
        run(scenario)


def test_client_verifies_tls_and_trusts_the_given_ca() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=vector("3", metric={}), content_type="application/json")

    with tempfile.TemporaryDirectory() as tmp:
        cert, key, pem = self_signed_certificate(Path(tmp))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)

        async def untrusted(client: PrometheusClient) -> None:
            async with serving(handler, context) as url:
                await client.query_rate(url, "up", timeout=3)

        with pytest.raises(rates.PrometheusUnavailable, match="TLS"):
            run(untrusted)

        async def trusted(client: PrometheusClient) -> float:
            async with serving(handler, context) as url:
                return await client.query_rate(url, "up", ca_pem=pem, timeout=3)

        assert run(trusted) == 3.0

    async def bad_ca(client: PrometheusClient) -> None:
        await client.query_rate("https://127.0.0.1:9", "up", ca_pem="not a PEM")

    with pytest.raises(rates.PrometheusUnavailable, match="CA certificate is not usable"):
        run(bad_ca)


# -- what the operator remembers between polls -------------------------------------------------


def test_rate_state_resumes_from_the_status() -> None:
    from melange.controller.state import RateState

    status = {
        "solvedRate": 68,
        "lastObservationTime": "2026-03-04T05:06:07Z",
        "rateHistory": [{"time": "2026-03-04T05:06:07Z", "rate": 70.5}],
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "Reconciled", "message": "ok"},
            {"type": "RateObserved", "status": "False", "reason": "NoData", "message": "none"},
        ],
    }
    state = RateState.from_status(status)
    assert state.solved_rate == 68.0
    assert state.plan_rate() == 68.0  # observed before: a spec change keeps the decided rate
    assert state.history == [RateSample(T0, 70.5)]
    assert state.condition == Condition(RATE_OBSERVED, "False", "NoData", "none")
    fresh = RateState.from_status({"solvedRate": 34})
    assert fresh.plan_rate() is None  # never observed: spec.workload.totalRate


def test_a_rate_no_allocation_can_be_planned_for_is_invalid() -> None:
    body = json.dumps(
        {"status": "success", "data": {"resultType": "scalar", "result": [1712345678.1, "2e9"]}}
    )
    with pytest.raises(rates.InvalidValue, match="more than the 1e\\+09 an allocation"):
        rates.parse_query_response(200, body)
