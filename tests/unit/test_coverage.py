"""Whether a rate's range was covered by samples (`melange.signals.coverage`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from melange import api
from melange.controller import decide
from melange.signals import coverage
from melange.signals.coverage import Coverage, PartialWindow
from melange.signals.rates import InvalidResponse, QueryFailed

AT = 1_800_000_000.0


def matrix(*series: Sequence[float]) -> str:
    """A range-vector answer: one series per sequence of sample times."""
    return json.dumps(
        {
            "status": "success",
            "data": {
                "resultType": "matrix",
                "result": [
                    {"metric": {"pod": f"p{k}"}, "values": [[t, str(100 + t)] for t in times]}
                    for k, times in enumerate(series)
                ],
            },
        }
    )


def scrapes(first: float, last: float, every: float) -> list[float]:
    count = round((last - first) / every)
    return [first + k * every for k in range(count + 1)]


def parse(body: str, range_seconds: float = 120) -> Coverage:
    return coverage.parse_samples_response(200, body, at=AT, range_seconds=range_seconds)


def test_a_range_scraped_throughout_is_covered() -> None:
    found = parse(matrix(scrapes(AT - 119, AT - 4, 15)))
    assert found.interval == 15
    assert found.fraction == 1.0
    assert found.covered
    coverage.check(found)  # no error


def test_a_range_that_starts_in_a_restart_gap_is_partial() -> None:
    """Prometheus back 20 s ago, scraping every second: the rate would read 17% of the truth."""
    found = parse(matrix(scrapes(AT - 20, AT - 0.5, 1)))
    assert found.fraction == pytest.approx((19.5 + 0.5 + 0.5) / 120)
    assert not found.covered
    with pytest.raises(PartialWindow) as raised:
        coverage.check(found)
    assert raised.value.reason == "PartialWindow"
    assert raised.value.message == (
        "the samples cover 17% of the rate's 120 s range (a gap at its start: Prometheus "
        "restarted or missed scrapes), so the rate would read low"
    )


def test_stale_samples_leave_the_range_partial() -> None:
    found = parse(matrix(scrapes(AT - 120, AT - 40, 1)))
    assert not found.covered
    assert "a gap at its end" in found.describe()


def test_one_series_covering_the_range_is_enough() -> None:
    """A pod that started mid-range does not make the range partial: Prometheus had data then."""
    found = parse(matrix(scrapes(AT - 60, AT - 1, 1), scrapes(AT - 119.5, AT - 0.5, 1)))
    assert found.covered


def test_scrape_jitter_is_not_a_gap() -> None:
    """A first sample a little more than 1.1 intervals after the start costs half an interval."""
    found = parse(matrix(scrapes(AT - 118.7, AT - 0.7, 1)))
    assert found.fraction > coverage.MIN_COVERED
    assert found.covered


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (matrix(), "no samples in the rate's 120 s range"),
        (matrix([AT - 3]), "a single sample in the rate's 120 s range"),
    ],
)
def test_too_few_samples_are_partial(body: str, message: str) -> None:
    found = parse(body)
    assert not found.covered
    assert found.describe() == message


def test_an_error_answer_raises_its_own_error() -> None:
    body = json.dumps({"status": "error", "errorType": "bad_data", "error": "parse error"})
    with pytest.raises(QueryFailed, match="parse error"):
        coverage.parse_samples_response(400, body, at=AT, range_seconds=120)


def test_a_vector_answer_is_not_coverage() -> None:
    body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": []}})
    with pytest.raises(InvalidResponse, match="did not return a range vector"):
        coverage.parse_samples_response(200, body, at=AT, range_seconds=120)


def test_samples_query_reads_the_default_query_series() -> None:
    assert coverage.samples_query("llama", 90) == (
        '{__name__=~"vllm[:_]request_success_total",model_name="llama"}[90s]'
    )


def source(**prometheus: object) -> api.RateSource:
    return api.RateSource.model_validate(
        {"prometheus": {"url": "http://prometheus:9090", **prometheus}, "intervalSeconds": 10}
    )


def test_only_the_default_query_is_checked() -> None:
    assert decide.rate_samples(source(modelName="m", rangeSeconds=60)) == (
        coverage.samples_query("m", 60),
        60,
    )
    assert decide.rate_samples(source(query="sum(rate(x[5m]))")) is None


def test_observations_are_consecutive_unless_a_poll_was_missed() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    every_10s = source(modelName="m")
    assert not decide.consecutive(None, now, every_10s)  # the first ever, or after a gap
    assert decide.consecutive(now - timedelta(seconds=30), now, every_10s)  # 2 x 10 s + 10 s
    assert not decide.consecutive(now - timedelta(seconds=31), now, every_10s)
