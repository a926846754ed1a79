"""Live prices per GPU type (spot prices): parsing what a source says, and when a change matters.

Pure: the controller reads the sources (a ConfigMap key, a PromQL query) and hands the answers
here. A price that moved by more than `priceTolerance` from the one the plan was solved with
re-solves; a price that cannot be read holds every price where it is, as a missing rate holds the
plan: a re-solve for another reason (the rate) uses the prices in effect.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from melange.api import MAX_COST_PER_HOUR, AllocationSpec, GpuType
from melange.signals.rates import (
    InvalidValue,
    NoData,
    QueryFailed,
    RateError,
    Scalar,
    format_time,
    parse_time,
    parse_vector_response,
)

PRICE_SOURCE_LABEL = "melange.dev/price-source"


class PriceUnavailable(RateError):
    reason = "PriceUnavailable"


@dataclass(frozen=True)
class Price:
    cost_per_hour: float
    source: str  # where it came from, as people name it ("spec", "ConfigMap team-a/prices h100")
    time: datetime | None = None  # when it was read; None for the spec's own


def parse_price(raw: Any, what: str) -> float:
    """A price as a source writes it (a number, or text such as "2.49"): finite, > 0, bounded."""
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise InvalidValue(f"{what} is not a number")
    try:
        value = float(raw)
    except ValueError:
        raise InvalidValue(f"{what} is not a number: {str(raw)[:40]!r}") from None
    if not math.isfinite(value) or value <= 0 or value > MAX_COST_PER_HOUR:
        raise InvalidValue(
            f"{what} is {value:g}; a price per hour is a number above 0 and at most "
            f"{MAX_COST_PER_HOUR:g}"
        )
    return value


def parse_price_response(
    http_status: int, body: bytes | str, url: str, *, content_type: str = ""
) -> float:
    """The price in an `/api/v1/query` answer: one series (or a scalar), a positive number."""
    samples = parse_vector_response(http_status, body, url, content_type=content_type)
    if isinstance(samples, Scalar):
        return parse_price(samples.value, "the price query's value")
    if not samples:
        raise NoData("the price query returned no series (is the price exporter scraped?)")
    if len(samples) > 1:
        raise QueryFailed(
            f"the price query returned {len(samples)} series; it must return one per GPU type"
        )
    return parse_price(samples[0][1], "the price query's value")


def in_effect(spec: AllocationSpec, status: Mapping[str, Any]) -> dict[str, Price]:
    """The prices the current plan was solved with: those in the status for types whose source
    is still the one named there, else the spec's own `costPerHour`."""
    stored: dict[str, Price] = {}
    for entry in status.get("prices") or ():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            continue
        cost, source = entry.get("costPerHour"), entry.get("source")
        if isinstance(cost, int | float) and not isinstance(cost, bool) and isinstance(source, str):
            stored[entry["name"]] = Price(float(cost), source, parse_time(entry.get("time")))
    prices = {}
    for gpu in spec.gpus:
        own = Price(gpu.cost_per_hour, "spec")
        kept = stored.get(gpu.name)
        named = source_name(gpu)
        prices[gpu.name] = kept if kept is not None and named and kept.source == named else own
    return prices


def source_name(gpu: GpuType) -> str | None:
    """How the status names a type's price source (None: the spec's own price)."""
    source = gpu.cost_per_hour_from
    if source is None:
        return None
    if source.config_map_key_ref is not None:
        ref = source.config_map_key_ref
        return f"ConfigMap {ref.name} key {ref.key}"
    return f"Prometheus {source.prometheus_query}"[:600]


@dataclass(frozen=True)
class PriceDecision:
    prices: dict[str, Price]  # the prices to solve with
    changed: tuple[str, ...] = ()  # types whose price moved beyond the tolerance: re-solve
    failed: tuple[tuple[str, RateError], ...] = ()  # types whose source could not be read


def decide(
    current: Mapping[str, Price],
    read: Mapping[str, float | RateError],
    tolerance: float,
    now: datetime,
    sources: Mapping[str, str],
) -> PriceDecision:
    """Adopt the read prices when one moved beyond the tolerance and none failed; else keep."""
    failed = tuple((name, v) for name, v in read.items() if isinstance(v, RateError))
    if failed:
        return PriceDecision(dict(current), failed=failed)
    changed = tuple(
        name
        for name, value in read.items()
        if isinstance(value, float)
        and (
            current[name].source != sources[name]
            or abs(value - current[name].cost_per_hour) > tolerance * current[name].cost_per_hour
        )
    )
    if not changed:
        return PriceDecision(dict(current))
    prices = dict(current)
    for name, value in read.items():
        assert isinstance(value, float)
        prices[name] = Price(value, sources[name], now)
    return PriceDecision(prices, changed=changed)


def to_status(prices: Mapping[str, Price]) -> list[dict[str, Any]]:
    entries = []
    for name, price in prices.items():
        entry: dict[str, Any] = {
            "name": name,
            "costPerHour": price.cost_per_hour,
            "source": price.source,
        }
        if price.time is not None:
            entry["time"] = format_time(price.time)
        entries.append(entry)
    return entries


def priced_spec(spec: AllocationSpec, prices: Mapping[str, Price]) -> AllocationSpec:
    """The spec with each type's `costPerHour` the price in effect."""
    gpus = [
        gpu.model_copy(update={"cost_per_hour": prices[gpu.name].cost_per_hour})
        if gpu.name in prices and prices[gpu.name].cost_per_hour != gpu.cost_per_hour
        else gpu
        for gpu in spec.gpus
    ]
    return spec.model_copy(update={"gpus": gpus})
