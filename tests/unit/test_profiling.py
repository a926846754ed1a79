"""The pure part of `melange profile`: percentiles, sizing, judging steps, the rate search, the
document that is both the profile and the resume state, and the time budget."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from melange.tools import measurement, profiles
from melange.tools.measurement import Criteria, RateSearch, StepPlan, StepResult

CRITERIA = Criteria(tpot_slo=0.04, percentile=90)


@given(
    st.lists(st.floats(min_value=0, max_value=10, allow_nan=False), min_size=1, max_size=50),
    st.floats(min_value=0, max_value=100),
)
def test_percentile_is_numpys_linear_definition(values: list[float], q: float) -> None:
    assert measurement.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_counts_unfinished_requests_as_over_the_slo() -> None:
    values = [0.01] * 8 + [math.inf] * 2
    assert measurement.percentile(values, 50) == 0.01
    assert measurement.percentile(values, 90) == math.inf
    with pytest.raises(ValueError, match="no values"):
        measurement.percentile([], 90)


@pytest.mark.parametrize(
    ("low", "high", "point", "expected"),
    [
        (1, 25, "mean", 7),  # as the shipped estimates: 24 / ln(25) = 7.46
        (1, 25, "geometric", 5),  # sqrt(1 * 25)
        (1, 25, "arithmetic", 13),
        (1, 25, "upper", 24),  # the bucket's largest request, not its (exclusive) edge
        (1, 2, "geometric", 1),  # always inside [low, high)
        (1, 2, "upper", 1),
        (128, 512, "geometric", 256),
    ],
)
def test_request_size(low: int, high: int, point: measurement.SizePoint, expected: int) -> None:
    assert measurement.request_size(low, high, point) == expected


@given(st.integers(1, 10_000), st.integers(1, 10_000), st.sampled_from(measurement.SIZE_POINTS))
def test_request_size_is_inside_the_bucket(low: int, width: int, point: str) -> None:
    size = measurement.request_size(low, low + width, point)  # type: ignore[arg-type]
    assert low <= size < low + width


def test_buckets_row_by_row() -> None:
    cells = measurement.buckets([1, 16, 256], [4, 16, 64], "geometric")
    assert [(b.row, b.column, b.prompt_tokens, b.output_tokens) for b in cells] == [
        (0, 0, 4, 8),
        (0, 1, 4, 32),
        (1, 0, 64, 8),
        (1, 1, 64, 32),
    ]
    assert cells[1].label == "input [1, 16) x output [16, 64)"


def test_calibration_steps() -> None:
    assert measurement.filler_words(100, overhead=1) == 99
    assert (
        measurement.filler_words(1, overhead=3) == 0
    )  # shorter than the fixed part: as short as it gets
    # the server counted 3 more tokens than wanted: 3 fewer filler words
    assert measurement.next_filler_words(99, measured=103, target=100) == 96
    assert measurement.next_filler_words(2, measured=10, target=1) == 0


def test_request_tpot() -> None:
    assert measurement.request_tpot(first=1.0, last=1.5, tokens=11) == pytest.approx(0.05)
    assert measurement.request_tpot(first=1.0, last=1.0, tokens=1) == 0.0


# --- steps ------------------------------------------------------------------------------------------


def test_plan_step() -> None:
    plan = measurement.plan_step(rate=10, step_seconds=20, request_seconds=3)
    assert plan == StepPlan(rate=10, warmup=3, window=20, drain=6)
    assert plan.seconds == 29
    # a window holds at least MIN_WINDOW_REQUESTS requests, up to MAX_WINDOW_STRETCH windows
    assert measurement.plan_step(rate=0.5, step_seconds=20, request_seconds=3).window == 40
    assert measurement.plan_step(rate=0.01, step_seconds=20, request_seconds=3).window == 100


def request(
    sent: float, tpot: float | None = 0.02, latency: float = 1.0
) -> measurement.RequestResult:
    if tpot is None:
        return measurement.RequestResult(sent=sent)  # never finished
    return measurement.RequestResult(
        sent=sent, finished=sent + latency, ttft=0.1, tpot=tpot, tokens=10
    )


def test_summarise_counts_only_the_window() -> None:
    plan = StepPlan(rate=2, warmup=1, window=5, drain=2)
    results = [request(t / 2) for t in range(0, 14)]  # sent 0 .. 6.5 s, each takes 1 s
    results[4] = request(2.0, tpot=0.5)  # slow, in the window
    results[5] = measurement.RequestResult(sent=2.5, error="HTTP 500: boom")
    results[6] = request(3.0, tpot=None)  # still running at the end of the drain
    step = measurement.summarise(results, plan, 50)
    assert step.sent == 10  # sent in [1, 6)
    assert (step.completed, step.errors, step.unfinished) == (8, 1, 1)
    assert step.error == "HTTP 500: boom"
    assert step.achieved == pytest.approx(8 / 5)  # finished in [1, 6): sent in [0, 5), minus 2
    assert step.tpot == pytest.approx(0.02)
    assert measurement.summarise(results, plan, 95).tpot == math.inf


def step_at(rate: float, tpot: float = 0.03, **fields: Any) -> StepResult:
    values: dict[str, Any] = {
        "rate": rate,
        "window": 10,
        "sent": round(rate * 10),
        "completed": round(rate * 10),
        "errors": 0,
        "unfinished": 0,
        "achieved": rate,
        "tpot": tpot,
        "ttft": 0.1,
    }
    return StepResult(**(values | fields))


def test_judge() -> None:
    assert measurement.judge(step_at(10), CRITERIA) is None
    assert measurement.judge(step_at(10, tpot=0.041), CRITERIA) == "p90 TPOT 41.0 ms > SLO 40 ms"
    assert "falling behind" in str(measurement.judge(step_at(10, achieved=8.9), CRITERIA))
    assert measurement.judge(step_at(10, achieved=9.0), CRITERIA) is None
    assert measurement.judge(step_at(10, errors=2), CRITERIA) is None  # 2 of 100
    assert measurement.judge(step_at(10, errors=3), CRITERIA) == "3 of 100 requests failed"
    assert "3 requests unfinished" in str(
        measurement.judge(step_at(10, tpot=math.inf, unfinished=3), CRITERIA)
    )
    assert measurement.judge(step_at(10, sent=0), CRITERIA) is not None
    assert measurement.mostly_failed(step_at(10, errors=51))
    assert not measurement.mostly_failed(step_at(10, errors=50))


# --- the search ---------------------------------------------------------------------------------------


def server(capacity: float) -> Callable[[float], StepResult]:
    """A server whose p90 TPOT crosses 40 ms exactly at `capacity` req/s."""

    def measure(rate: float) -> StepResult:
        return step_at(rate, tpot=0.04 * rate / capacity)

    return measure


def search_with(
    search: RateSearch,
    measure: Callable[[float], StepResult],
    stop: Callable[[float], bool] | None = None,
) -> bool:
    """`measurement.run_search` (the driver `melange.tools.endpoint` uses) with a synchronous server."""

    async def step(rate: float) -> StepResult:
        return measure(rate)

    return asyncio.run(measurement.run_search(search, step, stop))


@pytest.mark.parametrize("capacity", [0.3, 1.0, 3.7, 50.0, 1234.5])
@pytest.mark.parametrize("refine", [0, 3, 5])
def test_search_converges_below_the_capacity(capacity: float, refine: int) -> None:
    search = RateSearch(start=1.0, criteria=CRITERIA, refine=refine)
    assert search_with(search, server(capacity))
    # the highest pass is below the limit, by at most the bracket left after `refine` bisections
    assert search.throughput <= capacity
    assert search.throughput >= capacity * (1 - 1 / 2**refine) - 1e-9
    rates = [s.rate for s, _ in search.steps]
    assert len(rates) == len(set(rates))


def test_search_doubles_then_bisects() -> None:
    search = RateSearch(start=1.0, criteria=CRITERIA, refine=2)
    search_with(search, server(5.0))
    assert [s.rate for s, _ in search.steps] == [1, 2, 4, 8, 6, 5]
    assert [v is None for _, v in search.steps] == [True, True, True, False, False, True]
    assert search.throughput == 5


def test_search_halves_when_the_start_fails() -> None:
    search = RateSearch(start=8.0, criteria=CRITERIA, refine=1)
    search_with(search, server(3.0))
    assert [s.rate for s, _ in search.steps] == [8, 4, 2, 3]
    assert search.throughput == 3


def test_search_gives_zero_when_nothing_passes() -> None:
    search = RateSearch(start=1.0, criteria=CRITERIA)
    search_with(search, lambda rate: step_at(rate, tpot=0.05))
    assert search.throughput == 0
    assert min(s.rate for s, _ in search.steps) == pytest.approx(
        1 / 2**measurement.MAX_SHRINK_STEPS
    )


def test_search_stops_growing_on_a_server_that_never_saturates() -> None:
    search = RateSearch(start=1.0, criteria=CRITERIA)
    search_with(search, step_at)
    assert search.unbounded
    assert len(search.steps) == measurement.MAX_GROWTH_STEPS + 1


def test_search_falling_behind_fails_a_step() -> None:
    """A server with a queue (max_num_seqs) keeps TPOT low but falls behind above its capacity."""

    def queueing(rate: float) -> StepResult:
        return step_at(rate, tpot=0.02, achieved=min(rate, 6.0))

    search = RateSearch(start=1.0, criteria=CRITERIA, refine=4)
    search_with(search, queueing)
    assert 6.0 <= search.throughput <= 6.0 / measurement.KEEP_UP


def test_search_stops_when_told() -> None:
    search = RateSearch(start=1.0, criteria=CRITERIA)
    assert not search_with(search, server(100.0), stop=lambda rate: rate > 4)
    assert [s.rate for s, _ in search.steps] == [1, 2, 4]


def test_budget() -> None:
    budget = measurement.Budget(started=100.0, seconds=60.0)
    assert budget.fits(now=130.0, needed=30.0)
    assert not budget.fits(now=130.0, needed=30.1)
    assert measurement.Budget(started=0.0, seconds=None).fits(now=1e9, needed=1e9)


def test_budget_cuts_the_search_before_a_step_that_does_not_fit() -> None:
    """How `melange.tools.endpoint.measure_bucket` uses it: each step is planned, then checked."""
    budget = measurement.Budget(started=0.0, seconds=40.0)
    clock = [0.0]

    def measure(rate: float) -> StepResult:
        clock[0] += measurement.plan_step(rate, 5, 1).seconds
        return server(100.0)(rate)

    search = RateSearch(start=1.0, criteria=CRITERIA)
    finished = search_with(
        search,
        measure,
        stop=lambda rate: not budget.fits(clock[0], measurement.plan_step(rate, 5, 1).seconds),
    )
    assert not finished
    # 1 req/s: 1 s warm-up, a window of 20 requests, 2 s drain (23 s); 2 req/s: 13 s; the third
    # (4 req/s, 8 s) would end at 44 s
    assert clock[0] == 36.0
    assert [s.rate for s, _ in search.steps] == [1, 2]


# --- the document -------------------------------------------------------------------------------------

CONDITIONS = measurement.Conditions(
    endpoint="http://gpu-1:8000",
    model="meta-llama/Llama-3.1-8B-Instruct",
    tpot_seconds=0.04,
    percentile=90,
    input_edges=(1, 128, 512),
    output_edges=(1, 64, 256),
    size_point="geometric",
    arrivals="uniform",
)
META = measurement.Meta(
    profile=measurement.default_profile_name(CONDITIONS.model, "L4", 0.04),
    gpu="L4",
    cost_per_hour=0.8,
    model=CONDITIONS.model,
    tool="melange 0.1.0",
)


def measured(bucket: measurement.Bucket, capacity: float) -> measurement.BucketMeasurement:
    search = RateSearch(start=1.0, criteria=CRITERIA)
    search_with(search, server(capacity))
    return measurement.BucketMeasurement(
        bucket=bucket,
        throughput=search.throughput,
        prompt_tokens=bucket.prompt_tokens,
        completion_tokens=bucket.output_tokens,
        unloaded_ttft=0.05,
        unloaded_tpot=0.01,
        steps=search.steps,
    )


def test_default_profile_name_is_a_valid_name() -> None:
    assert META.profile == "meta-llama/llama-3.1-8b-instruct/l4/tpot-40ms"
    assert profiles.PROFILE_NAME.match(
        measurement.default_profile_name("Qwen 2.5 (7B)", "H100 SXM", 0.1)
    )


def test_document_is_a_valid_profile_only_when_complete() -> None:
    document = measurement.new_document(META, CONDITIONS)
    cells = measurement.buckets([1, 128, 512], [1, 64, 256], "geometric")
    assert measurement.pending(document) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for n, bucket in enumerate(cells):
        assert profiles.validate_profile(document) != []  # nulls in `throughput`
        with pytest.raises(ValueError, match="pending"):
            measurement.finish_document(document, "2025-01-01T00:00:00+00:00")
        measurement.record_bucket(document, measured(bucket, capacity=10.0 * (n + 1) - 0.1))
    assert measurement.pending(document) == []
    final = measurement.finish_document(document, "2025-01-01T00:00:00+00:00")
    assert profiles.validate_profile(final) == []
    # e.g. 9.9 req/s: 1, 2, 4, 8 pass, 16 fails, then 3 bisections: 12 and 10 fail, 9 passes
    assert final["throughput"] == [[9, 18], [28, 36]]
    assert final["measurement"]["date"] == "2025-01-01T00:00:00+00:00"
    assert "pending" not in final["measurement"]
    records = final["measurement"]["buckets"]
    assert [r["throughput"] for r in records] == [9, 18, 28, 36]
    assert records[0]["tpotSeconds"] == 0.03636  # at the rate that is the throughput
    assert records[0]["steps"][-1] == {
        "rate": 9,
        "achievedRate": 9,
        "tpotSeconds": 0.03636,
        "ttftSeconds": 0.1,
        "requests": 90,
        "errors": 0,
        "unfinished": 0,
        "passed": True,
    }
    assert measurement.is_finished(final)
    assert not measurement.is_finished(document)


def test_recording_a_bucket_again_replaces_it() -> None:
    document = measurement.new_document(META, CONDITIONS)
    bucket = measurement.buckets([1, 128, 512], [1, 64, 256], "geometric")[0]
    measurement.record_bucket(document, measured(bucket, 9.9))
    measurement.record_bucket(document, measured(bucket, 19.9))
    assert [b["throughput"] for b in document["measurement"]["buckets"]] == [18]
    assert document["throughput"][0][0] == 18


def test_resume_only_under_the_same_conditions() -> None:
    document = measurement.new_document(META, CONDITIONS)
    assert CONDITIONS.mismatches(document) == []
    other = measurement.Conditions(
        **(
            vars(CONDITIONS)
            | {"tpot_seconds": 0.05, "output_edges": (1, 64), "endpoint": "http://gpu-2:8000"}
        )
    )
    assert other.mismatches(document) == [
        "URL: http://gpu-2:8000 now, http://gpu-1:8000 in the file",
        "--tpot-slo: 0.05 now, 0.04 in the file",
        "--output-edges: 1,64 now, 1,64,256 in the file",
    ]
    assert CONDITIONS.mismatches({"profile": "x"}) != []  # not a measurement at all


def test_a_resumed_run_may_rename_and_reprice() -> None:
    document = measurement.new_document(META, CONDITIONS)
    renamed = measurement.Meta(
        profile="llama/l4-spot", gpu="L4-spot", cost_per_hour=0.3, model="llama", tool="melange 0.2"
    )
    measurement.update_meta(document, renamed)
    assert (document["profile"], document["name"], document["costPerHour"]) == (
        "llama/l4-spot",
        "L4-spot",
        0.3,
    )
    assert CONDITIONS.mismatches(document) == []


def test_partial_header_says_how_to_resume() -> None:
    document = measurement.new_document(META, CONDITIONS)
    bucket = measurement.buckets([1, 128, 512], [1, 64, 256], "geometric")[0]
    measurement.record_bucket(document, measured(bucket, 10.0))
    assert measurement.partial_header(document).startswith("# PARTIAL: 1 of 4 buckets measured")
