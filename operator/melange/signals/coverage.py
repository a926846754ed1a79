"""Whether a rate's range was fully covered by samples: a partial window is not an observation.

`rate(x[R])` over a range that starts inside a gap (Prometheus restarted, or missed scrapes) sees
only the samples after the gap and extrapolates them by at most half a scrape interval, so it reads
low: a true 40 req/s can read 9 req/s right after a restart. Prometheus itself treats a range as
covered at an end when the nearest sample is within 1.1 average sample intervals of it (its
extrapolation threshold); `coverage` applies the same rule to the raw samples of the rate's series,
asked for with the same evaluation time as the rate, and says how much of the range was seen.

Pure: the query text, reading the answer, the verdict. `melange.signals.prometheus` does the HTTP.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from melange.signals.rates import (
    MODEL_LABEL,
    REQUEST_SUCCESS_METRIC,
    InvalidResponse,
    RateError,
    parse_vector_response,
    promql_string,
)

# Prometheus extrapolates a rate to a range's end when its nearest sample is at most this many
# average sample intervals away, else by half an interval only (promql/functions.go,
# extrapolatedRate).
EXTRAPOLATION_THRESHOLD = 1.1
# A range whose samples account for less than this share of it is partial: its rate reads low by
# more than scrape jitter explains.
MIN_COVERED = 0.95


class PartialWindow(RateError):
    """The rate's range is not covered by samples (a gap at its start or end): it would read low."""

    reason = "PartialWindow"


def samples_query(model_name: str, range_seconds: int) -> str:
    """The raw samples behind `rates.default_query`: the same series over the same range."""
    selector = f'{{__name__=~"{REQUEST_SUCCESS_METRIC}",{MODEL_LABEL}={promql_string(model_name)}}}'
    return f"{selector}[{range_seconds}s]"


@dataclass(frozen=True)
class Coverage:
    """What the samples of a range show: when the first and the last were taken, how often."""

    start: float  # the range's start (evaluation time - range), Unix seconds
    end: float  # the evaluation time
    first: float | None  # the earliest sample of any series; None when there is none
    last: float | None  # the latest sample of any series
    interval: float | None  # the average time between a series' samples; None below two samples

    def _reach(self, gap: float) -> float:
        """How much of a gap between a sample and the range's end the rate extrapolates over."""
        assert self.interval is not None
        return gap if gap <= EXTRAPOLATION_THRESHOLD * self.interval else self.interval / 2

    @property
    def fraction(self) -> float:
        """The share of the range the rate accounts for (it reads about this share of the truth)."""
        if self.first is None or self.last is None or self.interval is None:
            return 0.0
        head, tail = max(self.first - self.start, 0.0), max(self.end - self.last, 0.0)
        seen = (self.last - self.first) + self._reach(head) + self._reach(tail)
        return min(seen / (self.end - self.start), 1.0)

    @property
    def covered(self) -> bool:
        return self.fraction >= MIN_COVERED

    def describe(self) -> str:
        """Why the range is partial, for the RateObserved condition (the plan is kept meanwhile)."""
        span = self.end - self.start
        if self.first is None or self.last is None:
            return f"no samples in the rate's {span:g} s range"
        if self.interval is None:
            return f"a single sample in the rate's {span:g} s range"
        where = (
            "at its start: Prometheus restarted or missed scrapes"
            if self.first - self.start > self.end - self.last
            else "at its end: the newest samples are missing"
        )
        return (
            f"the samples cover {self.fraction:.0%} of the rate's {span:g} s range (a gap {where}), "
            "so the rate would read low"
        )


def parse_samples_response(
    http_status: int,
    body: bytes | str,
    *,
    at: float,
    range_seconds: float,
    url: str = "Prometheus",
    content_type: str = "",
) -> Coverage:
    """The coverage of a range-vector answer (`samples_query`) evaluated at `at`."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    data = document.get("data") if isinstance(document, Mapping) else None
    if (
        isinstance(document, Mapping)
        and document.get("status") == "success"
        and isinstance(data, Mapping)
        and data.get("resultType") == "matrix"
    ):
        return _coverage(data.get("result"), at, range_seconds)
    # raises the error the answer carries
    parse_vector_response(http_status, body, url, content_type=content_type)
    raise InvalidResponse(f"the samples query to {url} did not return a range vector (matrix)")


def _coverage(result: Any, at: float, range_seconds: float) -> Coverage:
    if not isinstance(result, list):
        raise InvalidResponse("malformed matrix result: not a list")
    firsts, lasts, intervals = [], [], []
    for series in result:
        times = _times(series)
        if not times:
            continue
        firsts.append(times[0])
        lasts.append(times[-1])
        if len(times) > 1:
            intervals.append((times[-1] - times[0]) / (len(times) - 1))
    return Coverage(
        start=at - range_seconds,
        end=at,
        first=min(firsts) if firsts else None,
        last=max(lasts) if lasts else None,
        interval=sorted(intervals)[len(intervals) // 2] if intervals else None,
    )


def _times(series: Any) -> list[float]:
    values = series.get("values") if isinstance(series, Mapping) else None
    if not isinstance(values, list):
        raise InvalidResponse("malformed series: no list of values")
    times = []
    for pair in values:
        moment = pair[0] if isinstance(pair, list) and len(pair) == 2 else None
        if (
            not isinstance(moment, int | float)
            or isinstance(moment, bool)
            or not math.isfinite(moment)
        ):
            raise InvalidResponse("malformed sample: no [time, value] pair with a finite time")
        times.append(float(moment))
    return sorted(times)


def check(coverage: Coverage) -> None:
    """Raise `PartialWindow` unless the range was covered."""
    if not coverage.covered:
        raise PartialWindow(coverage.describe())
