"""Live prices: what a source may say, when a change re-solves, and that a missing price holds."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from melange import api
from melange.signals import prices
from melange.signals.rates import InvalidValue, NoData, QueryFailed, RateError

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SOURCE = "Prometheus spot"


def spec(**extra: Any) -> api.AllocationSpec:
    return api.validate_spec(
        {
            "buckets": {"inputTokens": [1, 100], "outputTokens": [1, 100]},
            "workload": {"distribution": [[1.0]], "totalRate": 10},
            "gpus": [
                {"name": "A", "costPerHour": 1.0, "throughput": [[10.0]]},
                {
                    "name": "B",
                    "costPerHour": 3.0,
                    "throughput": [[40.0]],
                    "costPerHourFrom": {"configMapKeyRef": {"name": "p", "key": "b"}},
                },
            ],
            **extra,
        }
    )


@pytest.mark.parametrize(
    ("raw", "expected"), [("2.49", 2.49), (" 3 ", 3.0), (7, 7.0), ("1e9", 1e9)]
)
def test_a_price_is_a_positive_bounded_number(raw: Any, expected: float) -> None:
    assert prices.parse_price(raw, "the price") == expected


@pytest.mark.parametrize("raw", ["0", "-1", "NaN", "inf", "cheap", "", True, None, "2e9"])
def test_anything_else_is_refused_with_what_it_is(raw: Any) -> None:
    with pytest.raises(InvalidValue, match="the price"):
        prices.parse_price(raw, "the price")


def _answer(result: list[Any]) -> bytes:
    return json.dumps(
        {"status": "success", "data": {"resultType": "vector", "result": result}}
    ).encode()


def test_a_query_answers_one_series_per_type() -> None:
    one = _answer([{"metric": {"gpu": "B"}, "value": [0, "2.5"]}])
    assert prices.parse_price_response(200, one, "http://p") == 2.5
    with pytest.raises(NoData, match="no series"):
        prices.parse_price_response(200, _answer([]), "http://p")
    two = _answer(
        [{"metric": {"z": "1"}, "value": [0, "1"]}, {"metric": {"z": "2"}, "value": [0, "2"]}]
    )
    with pytest.raises(QueryFailed, match="2 series"):
        prices.parse_price_response(200, two, "http://p")


def test_the_prices_in_effect_are_the_stored_ones_while_the_source_is_the_same() -> None:
    own = spec()
    assert {n: p.cost_per_hour for n, p in prices.in_effect(own, {}).items()} == {
        "A": 1.0,
        "B": 3.0,
    }
    stored = {"prices": [{"name": "B", "costPerHour": 5.0, "source": "ConfigMap p key b"}]}
    assert prices.in_effect(own, stored)["B"].cost_per_hour == 5.0
    other = {"prices": [{"name": "B", "costPerHour": 5.0, "source": "ConfigMap q key b"}]}
    assert prices.in_effect(own, other)["B"].cost_per_hour == 3.0  # another source: start over


def test_a_move_beyond_the_tolerance_re_solves_a_smaller_one_does_not() -> None:
    current = {"A": prices.Price(1.0, "spec"), "B": prices.Price(3.0, SOURCE, NOW)}
    small = prices.decide(current, {"B": 3.1}, 0.05, NOW, {"B": SOURCE})
    assert not small.changed
    assert small.prices["B"].cost_per_hour == 3.0
    large = prices.decide(current, {"B": 3.3}, 0.05, NOW, {"B": SOURCE})
    assert large.changed == ("B",)
    assert large.prices["B"].cost_per_hour == 3.3
    assert large.prices["A"].cost_per_hour == 1.0


def test_a_missing_price_holds_every_price() -> None:
    current = {"B": prices.Price(3.0, SOURCE, NOW), "C": prices.Price(2.0, "Prometheus c")}
    read: dict[str, float | RateError] = {"B": 9.0, "C": NoData("no series")}
    held = prices.decide(current, read, 0.05, NOW, {"B": SOURCE, "C": "Prometheus c"})
    assert not held.changed
    assert held.prices == current
    assert [name for name, _ in held.failed] == ["C"]


def test_prices_round_trip_through_the_status_and_price_the_spec() -> None:
    own = spec()
    decided = prices.decide(
        prices.in_effect(own, {}), {"B": 4.0}, 0.05, NOW, {"B": "ConfigMap p key b"}
    )
    status = {"prices": prices.to_status(decided.prices)}
    assert prices.in_effect(own, status) == decided.prices
    priced = prices.priced_spec(own, decided.prices)
    assert [g.cost_per_hour for g in priced.gpus] == [1.0, 4.0]


def test_a_prometheus_price_needs_a_rate_source() -> None:
    with pytest.raises(api.SpecError, match=r"needs spec\.rateSource"):
        api.validate_spec(
            {
                "buckets": {"inputTokens": [1, 100], "outputTokens": [1, 100]},
                "workload": {"distribution": [[1.0]], "totalRate": 10},
                "gpus": [
                    {
                        "name": "A",
                        "costPerHour": 1.0,
                        "throughput": [[10.0]],
                        "costPerHourFrom": {"prometheusQuery": "spot"},
                    }
                ],
            }
        )
