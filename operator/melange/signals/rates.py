"""The live request rate: the default PromQL query, reading Prometheus' answer, the drift decision.

Pure functions, no I/O (`melange.signals.prometheus` does the HTTP, the handlers the Kubernetes side), so
every rule is unit-tested with `now` passed in:

- `default_query`: vLLM's request rate for one model, under either spelling of its metric names;
- `parse_query_response`: one usable rate out of a Prometheus HTTP API answer, or a `RateError`
  that says exactly what was wrong (a missing series means "unknown", never 0);
- `decide`: keep the plan, or re-solve it for another rate, HPA-style: up as soon as the observed
  rate exceeds the solved one by more than the tolerance; down only to the highest rate observed
  within the stabilization window, and only when that is below the solved rate by more than the
  tolerance. The window's history lives in `status.rateHistory`, so a restart resumes it, and a
  gap in the observations (a failed or partial query, a restart) does not empty it: samples leave
  the window only once it has been refilled by a whole window of consecutive observations.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from melange.api import MAX_RATE

DEFAULT_RANGE_SECONDS = 120
MAX_HISTORY = 1024  # the CRD's maxItems for status.rateHistory
# vLLM names its metrics `vllm:...`; a Prometheus that scrapes OpenMetrics from an older client
# stores them as `vllm_...`. The default query matches both spellings.
REQUEST_SUCCESS_METRIC = "vllm[:_]request_success_total"
MODEL_LABEL = "model_name"


# -- errors -------------------------------------------------------------------------------------


class RateError(Exception):
    """No usable rate. `reason` is the `RateObserved=False` condition's reason, the message says why."""

    reason = "RateUnavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PrometheusUnavailable(RateError):
    """Unreachable, too slow, or a server-side outage (HTTP 5xx)."""

    reason = "PrometheusUnavailable"


class QueryFailed(RateError):
    """Prometheus answered but rejected or could not run the query, or it returned several series."""

    reason = "QueryFailed"


class NoData(RateError):
    """The query returned no series: the rate is unknown (not zero)."""

    reason = "NoData"


class InvalidValue(RateError):
    """A value that is no rate: NaN, infinite, negative."""

    reason = "InvalidValue"


class InvalidResponse(RateError):
    """The answer is not the Prometheus HTTP API's JSON."""

    reason = "InvalidResponse"


class CredentialsUnavailable(RateError):
    """The bearer-token Secret or the CA ConfigMap named in the spec cannot be read, or its owner
    has not let rate sources use it."""

    reason = "CredentialsUnavailable"


class URLNotAllowed(RateError):
    """The operator does not query this URL (or does not send this allocation's token to it)."""

    reason = "URLNotAllowed"


# -- the default query --------------------------------------------------------------------------


def promql_string(value: str) -> str:
    """A PromQL double-quoted string literal."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def default_query(model_name: str, range_seconds: int = DEFAULT_RANGE_SECONDS) -> str:
    """vLLM's finished requests per second for one served model, summed over its engines and pods.

    `model_name` is the label vLLM puts on every series (its `--served-model-name`). The metric name
    is matched by regular expression so both `vllm:request_success_total` and
    `vllm_request_success_total` count.
    """
    selector = f'{{__name__=~"{REQUEST_SUCCESS_METRIC}",{MODEL_LABEL}={promql_string(model_name)}}}'
    return f"sum(rate({selector}[{range_seconds}s]))"


# -- reading Prometheus' answer -----------------------------------------------------------------

_UNAVAILABLE_ERROR_TYPES = {"timeout", "canceled", "unavailable"}


def _snippet(text: str, limit: int = 200) -> str:
    """One line of at most `limit` printable characters. Only for Prometheus' own structured
    fields (`errorType`, `error`, labels): the body of an answer never goes into a message."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _described(http_status: int, content_type: str, size: int) -> str:
    """What is told of an answer that is not Prometheus' JSON: nothing of its body."""
    kind = _snippet(content_type.split(";", maxsplit=1)[0], 60) or "no content type"
    return f"HTTP {http_status}, {kind}, {size} bytes"


def _as_rate(raw: Any, what: str) -> float:
    """A sample value as Prometheus sends it (a string such as "1.5", "NaN", "+Inf")."""
    if not isinstance(raw, str | int | float) or isinstance(raw, bool):
        raise InvalidResponse(f"{what} is not a number (a JSON {type(raw).__name__})")
    try:
        value = float(raw)
    except ValueError:
        raise InvalidResponse(f"{what} is not a number") from None
    if math.isnan(value):
        raise InvalidValue(f"{what} is NaN (a division by zero?), not a rate")
    if math.isinf(value):
        raise InvalidValue(f"{what} is {'+' if value > 0 else '-'}Inf, not a rate")
    if value < 0:
        raise InvalidValue(f"{what} is {value:g}; a request rate cannot be negative")
    return value


def _labels(metric: Any) -> str:
    if not isinstance(metric, Mapping) or not metric:
        return "{}"
    return _snippet("{" + ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items())) + "}", 120)


@dataclass(frozen=True)
class Scalar:
    """A scalar answer's raw value (as Prometheus sends it: a string such as "1.5")."""

    value: Any


def parse_vector_response(
    http_status: int, body: bytes | str, url: str = "Prometheus", *, content_type: str = ""
) -> list[tuple[Mapping[str, Any], Any]] | Scalar:
    """The samples of an `/api/v1/query` answer: `(labels, raw value)` per series of an instant
    vector, or a `Scalar`; else a `RateError` naming what was wrong.

    A message quotes Prometheus' own `errorType` and `error` fields only, never the body of an
    answer: the url may point at something that is not Prometheus.
    """
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if not isinstance(document, Mapping) or document.get("status") not in {"success", "error"}:
        answer = f"the answer from {url} is not Prometheus API JSON"
        what = _described(http_status, content_type, len(body))
        if http_status >= 500:
            raise PrometheusUnavailable(f"{answer} ({what})")
        if http_status >= 400:
            raise QueryFailed(
                f"{answer} ({what}; is the url Prometheus' base URL, and are the credentials "
                "right?)"
            )
        raise InvalidResponse(f"{answer} ({what})")
    if document["status"] == "error":
        error_type = _snippet(str(document.get("errorType") or "error"), 40)
        error = _snippet(str(document.get("error") or "(no message)"))
        message = f"Prometheus: {error_type}: {error} (HTTP {http_status})"
        if error_type in _UNAVAILABLE_ERROR_TYPES:
            raise PrometheusUnavailable(message)
        raise QueryFailed(message)
    if http_status >= 400:
        raise InvalidResponse(f"HTTP {http_status} from {url} with status success")
    data = document.get("data")
    if not isinstance(data, Mapping):
        raise InvalidResponse(f"the answer from {url} has no data (HTTP {http_status})")
    result_type, result = data.get("resultType"), data.get("result")
    if result_type == "scalar":
        if not isinstance(result, list) or len(result) != 2:
            raise InvalidResponse(f"malformed scalar result from {url}: no [time, value] pair")
        return Scalar(result[1])
    if result_type != "vector":
        kind = {"matrix": "a range vector (matrix)", "string": "a string"}.get(
            str(result_type), "an unknown result type"
        )
        raise QueryFailed(
            f"the query returned {kind}; it must return an instant vector (or a scalar)"
        )
    if not isinstance(result, list):
        raise InvalidResponse(f"malformed vector result from {url}: not a list")
    samples = []
    for sample in result:
        value = sample.get("value") if isinstance(sample, Mapping) else None
        if not isinstance(value, list) or len(value) != 2:
            raise InvalidResponse(f"malformed sample from {url}: no [time, value] pair")
        metric = sample.get("metric")
        samples.append((metric if isinstance(metric, Mapping) else {}, value[1]))
    return samples


def parse_query_response(
    http_status: int, body: bytes | str, url: str = "Prometheus", *, content_type: str = ""
) -> float:
    """The rate in an `/api/v1/query` answer, or a `RateError` naming what was wrong with it.

    Accepted: an instant vector with exactly one sample, or a scalar; the value finite and >= 0.
    """
    samples = parse_vector_response(http_status, body, url, content_type=content_type)
    if isinstance(samples, Scalar):
        return _bounded(_as_rate(samples.value, "the query's value"))
    if not samples:
        raise NoData(
            "the query returned no series, so the rate is unknown (is the model serving, and is "
            "its metric scraped?)"
        )
    if len(samples) > 1:
        shown = ", ".join(_labels(metric) for metric, _ in samples[:3])
        more = f" and {len(samples) - 3} more" if len(samples) > 3 else ""
        raise QueryFailed(
            f"the query returned {len(samples)} series ({shown}{more}); it must return one: "
            "aggregate it, e.g. sum(...)"
        )
    return _bounded(_as_rate(samples[0][1], "the query's value"))


def _bounded(rate: float) -> float:
    """A rate an allocation can be planned for: at most `MAX_RATE`, as `workload.totalRate`."""
    if rate > MAX_RATE:
        raise InvalidValue(
            f"the query's value is {rate:g} req/s, more than the {MAX_RATE:g} an allocation "
            "can be planned for (is it a rate in requests per second?)"
        )
    return rate


# -- the decision -------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class RateSample:
    time: datetime
    rate: float


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC, second precision (as status timestamps are stored)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def history_from_status(raw: Any) -> list[RateSample]:
    """`status.rateHistory` as samples, oldest first; malformed entries are skipped."""
    samples = []
    for item in raw if isinstance(raw, list) else ():
        if not isinstance(item, Mapping):
            continue
        moment, rate = parse_time(item.get("time")), item.get("rate")
        if moment is None or not isinstance(rate, int | float) or isinstance(rate, bool):
            continue
        if math.isfinite(rate) and rate >= 0:
            samples.append(RateSample(moment, float(rate)))
    return sorted(samples)


def history_to_status(samples: Iterable[RateSample]) -> list[dict[str, Any]]:
    return [{"time": format_time(s.time), "rate": s.rate} for s in samples]


def _compact(samples: Sequence[RateSample], max_items: int) -> list[RateSample]:
    """Keep only the samples that can still be the window's maximum, at most `max_items`.

    A sample followed by a later one at least as high never decides anything again (the later one
    stays in the window longer), so what remains is strictly decreasing in rate. Past `max_items`,
    the two oldest merge into (later time, higher rate): the window then holds a high rate a little
    longer than it was seen, never shorter, so compaction can delay a scale-down but never hasten it.
    """
    kept: list[RateSample] = []
    for sample in sorted(samples, reverse=True):  # newest first
        if not kept or sample.rate > kept[-1].rate:
            kept.append(sample)
    kept.reverse()  # oldest first, rates strictly decreasing
    while len(kept) > max(max_items, 1):
        kept[0:2] = [RateSample(kept[1].time, kept[0].rate)]
    return kept


@dataclass(frozen=True)
class Decision:
    """Keep the plan (`rate is None`), or re-solve it for `rate`; `history` is the new window."""

    rate: float | None
    history: tuple[RateSample, ...]
    message: str

    @property
    def resolve(self) -> bool:
        return self.rate is not None


def _pct(change: float) -> str:
    return f"{abs(change):.0%}"


def decide(
    history: Sequence[RateSample],
    observed: float | None,
    solved: float | None,
    *,
    tolerance: float,
    window_seconds: float,
    now: datetime,
    first_observation: bool = False,
    observed_since: datetime | None = None,
    max_items: int = MAX_HISTORY,
) -> Decision:
    """Whether to re-solve, and for which rate.

    - `observed is None` (no usable rate): keep; missing data never scales anything.
    - `solved is None` (no plan yet): solve for the observed rate.
    - Up: `observed > solved * (1 + tolerance)` re-solves for `observed` at once.
    - Down: with `peak` the highest rate observed in the last `window_seconds` (this observation
      included), `peak < solved * (1 - tolerance)` re-solves for `peak`.
    - `first_observation`: the plan was solved for a rate nobody observed (spec.workload.totalRate),
      so that rate counts as observed now, and a scale-down waits a whole window, as an HPA seeds
      its window with the current replicas.
    - `observed_since`: when the current run of consecutive observations began (None: this one is the
      first after a gap or a restart). Samples older than the window leave it only once that run
      covers the whole window, so an outage never empties the window: its peak survives the gap
      until good observations have refilled it.
    Samples that can no longer be the window's maximum are dropped.
    """
    horizon = now - timedelta(seconds=window_seconds)
    refilled = observed_since is not None and observed_since <= horizon
    recent = [s for s in history if s.time > horizon or not refilled]
    if observed is None:
        return Decision(None, tuple(_compact(recent, max_items)), "no observed rate: plan kept")
    if not math.isfinite(observed) or observed < 0:
        raise ValueError(f"observed rate must be finite and >= 0, got {observed}")
    if first_observation and solved is not None and window_seconds > 0:
        recent.append(RateSample(now, solved))
    recent.append(RateSample(now, observed))
    peak = max(s.rate for s in recent)
    window = tuple(_compact(recent, max_items))
    if solved is None:
        return Decision(observed, window, f"no plan yet: solving for {observed:.4g} req/s")
    if observed > solved * (1 + tolerance):
        change = f"+{_pct(observed / solved - 1)}" if solved > 0 else "up from 0"
        return Decision(
            observed,
            window,
            f"observed {observed:.4g} req/s, {change} against the {solved:.4g} req/s the plan "
            f"was solved for (tolerance {tolerance:.0%}): re-solved for {observed:.4g} req/s",
        )
    if peak < solved * (1 - tolerance):
        return Decision(
            peak,
            window,
            f"the highest rate in the last {window_seconds:g} s is {peak:.4g} req/s, "
            f"-{_pct(1 - peak / solved)} against the {solved:.4g} req/s the plan was solved for "
            f"(tolerance {tolerance:.0%}): re-solved for {peak:.4g} req/s",
        )
    return Decision(None, window, f"observed {observed:.4g} req/s: within tolerance, plan kept")
