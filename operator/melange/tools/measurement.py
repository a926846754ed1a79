"""Measuring a GPU profile: the pure part of `melange profile` (no I/O; `melange.tools.endpoint` does it).

For each (input-length bucket, output-length bucket) the profile holds the highest request rate at
which the server keeps the chosen percentile of the time per output token (TPOT) within the SLO.
This module decides what to send and how to judge it; the HTTP client and the load generator call
it:

- **Sizing**: a bucket `[low, high)` is measured with requests of one representative length
  (`request_size`), by the same rules as the estimates (`melange.tools.perfmodel.representative_size`:
  by default the mean of lengths spread evenly in log space, or the geometric or arithmetic
  midpoint, or `high - 1`, the conservative worst case), rounded to whole tokens inside the bucket.
- **A step** offers open-loop load at one rate for a warm-up, then a measurement window
  (`plan_step`). It passes (`judge`) when the TPOT percentile of the requests sent in the window
  is within the SLO, the server completed at least `keep_up` of the offered rate in the window (so
  no queue is building up), and at most `max_error_fraction` of the requests failed.
- **The search** (`RateSearch`) starts from the rate of one request at a time (1 / the unloaded
  latency), doubles while steps pass, then bisects between the highest pass and the lowest fail
  `refine` times; if the first step fails it halves instead. The bucket's throughput is the highest
  passing rate, 0 when none passes.
- **The document** (`new_document`, `record_bucket`, `finish_document`) is a measured profile that
  `melange profiles import` accepts, and until every bucket is measured also the resume state:
  `measurement.pending` lists the buckets still to do and their throughput entries are null.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from melange.tools import profiles
from melange.tools.perfmodel import RepresentativeRule, representative_size

SizePoint = Literal["mean", "geometric", "arithmetic", "upper"]
SIZE_POINTS: tuple[str, ...] = get_args(SizePoint)
Arrivals = Literal["uniform", "poisson"]
ARRIVALS: tuple[str, ...] = get_args(Arrivals)
PromptMethod = Literal["calibrated", "approximate"]

KEEP_UP = 0.9  # share of the offered rate the server must complete in the window
MAX_ERROR_FRACTION = 0.02  # at most 1 failed request in 50
MIN_WINDOW_REQUESTS = 20  # a window is stretched to hold at least this many requests ...
MAX_WINDOW_STRETCH = 5.0  # ... but to no more than this many times --step-seconds
DRAIN_FACTOR = 2.0  # after the window, wait this many warm-ups for its requests to finish
GROWTH = 2.0
MAX_GROWTH_STEPS = 16  # 2^16 times the single-request rate: a server that is never saturated
MAX_SHRINK_STEPS = 6  # down to 1/64 of the single-request rate, then the bucket gets 0
SIGNIFICANT_DIGITS = 4
SCHEMA_VERSION = 1
# The filler that makes a prompt longer: one token per repeat with common BPE tokenizers, and one
# whitespace-separated word; calibration against the server's usage corrects any difference.
FILLER_WORD = "the"


# --- statistics and sizing ------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics.

    The same definition as numpy's default (`method="linear"`); `inf` values sort last, so requests
    counted as over the SLO push the percentile up. Raises ValueError when `values` is empty.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    low, high = ordered[below], ordered[above]
    if math.isinf(high) or low == high:
        return high if position > below else low
    return low + (high - low) * (position - below)


def request_size(low: int, high: int, point: SizePoint = "mean") -> int:
    """The whole number of tokens that stands for bucket `[low, high)`: `low <= n <= high - 1`."""
    rule: RepresentativeRule = point
    return min(high - 1, max(low, round(representative_size(low, high, rule))))


def bucket_label(inputs: tuple[int, int], outputs: tuple[int, int]) -> str:
    return f"input [{inputs[0]}, {inputs[1]}) x output [{outputs[0]}, {outputs[1]})"


@dataclass(frozen=True)
class Bucket:
    """One cell of the throughput matrix and the request that represents it."""

    row: int
    column: int
    inputs: tuple[int, int]
    outputs: tuple[int, int]
    prompt_tokens: int
    output_tokens: int

    @property
    def label(self) -> str:
        return bucket_label(self.inputs, self.outputs)


def buckets(
    input_edges: Sequence[int], output_edges: Sequence[int], point: SizePoint
) -> list[Bucket]:
    """Every bucket, row by row (input buckets), in the order they are measured."""
    return [
        Bucket(
            row=i,
            column=j,
            inputs=(input_edges[i], input_edges[i + 1]),
            outputs=(output_edges[j], output_edges[j + 1]),
            prompt_tokens=request_size(input_edges[i], input_edges[i + 1], point),
            output_tokens=request_size(output_edges[j], output_edges[j + 1], point),
        )
        for i in range(len(input_edges) - 1)
        for j in range(len(output_edges) - 1)
    ]


def filler_words(target: int, overhead: int) -> int:
    """Filler words for a prompt of `target` tokens when the rest of the prompt costs `overhead`."""
    return max(0, target - overhead)


def next_filler_words(words: int, measured: int, target: int) -> int:
    """Calibration: adjust the filler by the server's own count (one token per filler word)."""
    return max(0, words + target - measured)


# --- one request, one step --------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestResult:
    """What one streamed completion gave: times from sending it, in seconds."""

    sent: float  # when it was sent, from the start of the step
    finished: float | None = None  # when its stream ended (None: it did not finish)
    ttft: float | None = None  # time to the first token
    tpot: float | None = None  # (last token - first token) / (tokens - 1); 0 for one token
    tokens: int = 0  # completion tokens (usage, else content chunks)
    prompt_tokens: int | None = None  # usage.prompt_tokens, when the server reports it
    error: str | None = None  # why it failed (HTTP status and message, or the exception)


def request_tpot(first: float, last: float, tokens: int) -> float:
    """TPOT of one request: the decode time per token after the first (0 for a single token)."""
    return (last - first) / (tokens - 1) if tokens > 1 else 0.0


@dataclass(frozen=True)
class StepPlan:
    """How long one step offers load: a warm-up, the measured window, and a bounded drain."""

    rate: float
    warmup: float
    window: float
    drain: float  # after the window, at most this long for the window's requests to finish

    @property
    def seconds(self) -> float:
        """The longest the step takes."""
        return self.warmup + self.window + self.drain


def plan_step(rate: float, step_seconds: float, request_seconds: float) -> StepPlan:
    """The step at `rate`: the warm-up is the time one request takes at the SLO
    (`request_seconds`, TTFT + output tokens x SLO), so the first requests have completed and the
    number running is steady before the window opens; the window is `step_seconds`, stretched to
    hold at least MIN_WINDOW_REQUESTS requests (up to MAX_WINDOW_STRETCH times). The load goes on
    during the drain, so the window's last requests run at the same concurrency as the others.
    """
    warmup = max(request_seconds, 0.1)
    window = min(max(step_seconds, MIN_WINDOW_REQUESTS / rate), step_seconds * MAX_WINDOW_STRETCH)
    return StepPlan(rate=rate, warmup=warmup, window=window, drain=DRAIN_FACTOR * warmup)


@dataclass(frozen=True)
class StepResult:
    """One step at an offered rate, summarised over the requests sent in its window."""

    rate: float  # offered, req/s
    window: float  # seconds
    sent: int  # requests sent in the window
    completed: int  # of them, finished without error
    errors: int  # of them, failed
    unfinished: int  # of them, still running at the end of the drain (counted as over the SLO)
    achieved: float  # completions per second during the window (of any request)
    tpot: float | None  # the TPOT percentile over the window's requests; None when none finished
    ttft: float | None  # the same percentile of the time to first token
    error: str | None = None  # one of the errors, to show

    def as_record(self) -> dict[str, Any]:
        """The step as it is kept in `measurement.buckets[].steps`."""
        return {
            "rate": _round(self.rate),
            "achievedRate": _round(self.achieved),
            "tpotSeconds": None
            if self.tpot is None or math.isinf(self.tpot)
            else _round(self.tpot),
            "ttftSeconds": None if self.ttft is None else _round(self.ttft),
            "requests": self.sent,
            "errors": self.errors,
            "unfinished": self.unfinished,
        }


def summarise(results: Sequence[RequestResult], plan: StepPlan, percentile_q: float) -> StepResult:
    """A step's result from its requests (times from the start of the step)."""
    start, end = plan.warmup, plan.warmup + plan.window
    in_window = [r for r in results if start <= r.sent < end]
    failed = [r for r in in_window if r.error is not None]
    done = [r for r in in_window if r.error is None and r.finished is not None]
    unfinished = len(in_window) - len(failed) - len(done)
    tpots = [r.tpot if r.tpot is not None else 0.0 for r in done] + [math.inf] * unfinished
    ttfts = [r.ttft for r in done if r.ttft is not None]
    completions = sum(
        1
        for r in results
        if r.error is None and r.finished is not None and start <= r.finished < end
    )
    return StepResult(
        rate=plan.rate,
        window=plan.window,
        sent=len(in_window),
        completed=len(done),
        errors=len(failed),
        unfinished=unfinished,
        achieved=completions / plan.window,
        tpot=percentile(tpots, percentile_q) if done else None,
        ttft=percentile(ttfts, percentile_q) if ttfts else None,
        error=failed[0].error if failed else None,
    )


@dataclass(frozen=True)
class Criteria:
    """When a step passes."""

    tpot_slo: float
    percentile: float = 90.0
    keep_up: float = KEEP_UP
    max_error_fraction: float = MAX_ERROR_FRACTION


def judge(step: StepResult, criteria: Criteria) -> str | None:
    """None when the step passes, else why not (one short phrase)."""
    if step.sent == 0:
        return "no request was sent in the window"
    if step.errors > criteria.max_error_fraction * step.sent:
        return f"{step.errors} of {step.sent} requests failed"
    slo = f"SLO {criteria.tpot_slo * 1000:g} ms"
    if step.tpot is None:
        return "no request finished"
    if math.isinf(step.tpot):
        return f"p{criteria.percentile:g} TPOT > {slo} ({step.unfinished} requests unfinished)"
    if step.tpot > criteria.tpot_slo:
        return f"p{criteria.percentile:g} TPOT {step.tpot * 1000:.1f} ms > {slo}"
    if step.achieved < criteria.keep_up * step.rate:
        return f"completed {step.achieved:.3g} req/s of {step.rate:.3g} offered (falling behind)"
    return None


def mostly_failed(step: StepResult) -> bool:
    """Most requests of the step failed: the server is refusing them, not slow."""
    return step.sent > 0 and step.errors > step.sent / 2


# --- the search -------------------------------------------------------------------------------------


@dataclass
class RateSearch:
    """The highest passing rate of one bucket, found step by step.

    `next_rate()` says what to measure next (None: done), `record()` takes its result. Doubling
    from `start` while steps pass (halving while they fail, down to `start / 2^MAX_SHRINK_STEPS`),
    then `refine` bisections between the highest pass and the lowest fail: the answer is at most
    `(fail - pass) / 2^refine` below the limit that the steps observed.
    """

    start: float
    criteria: Criteria
    refine: int = 3
    growth: float = GROWTH
    highest_pass: float | None = None
    lowest_fail: float | None = None
    steps: list[tuple[StepResult, str | None]] = field(default_factory=list)
    _bisections: int = 0

    def next_rate(self) -> float | None:
        lo, hi = self.highest_pass, self.lowest_fail
        if lo is None and hi is None:
            return self.start
        if hi is None:
            assert lo is not None
            return None if len(self.steps) > MAX_GROWTH_STEPS else lo * self.growth
        if lo is None:
            shrunk = hi / self.growth
            return None if shrunk < self.start / self.growth**MAX_SHRINK_STEPS else shrunk
        return None if self._bisections >= self.refine else (lo + hi) / 2

    def record(self, step: StepResult) -> str | None:
        """Take a step's result; returns `judge`'s verdict (None: passed)."""
        verdict = judge(step, self.criteria)
        bracketed = self.highest_pass is not None and self.lowest_fail is not None
        if verdict is None:
            self.highest_pass = max(step.rate, self.highest_pass or 0.0)
        else:
            self.lowest_fail = min(step.rate, self.lowest_fail or math.inf)
        if bracketed:
            self._bisections += 1
        self.steps.append((step, verdict))
        return verdict

    @property
    def throughput(self) -> float:
        return self.highest_pass or 0.0

    @property
    def unbounded(self) -> bool:
        """The search stopped growing without a failing step: the limit is higher still."""
        return self.lowest_fail is None and self.highest_pass is not None


async def run_search(
    search: RateSearch,
    measure: Callable[[float], Awaitable[StepResult]],
    stop: Callable[[float], bool] | None = None,
) -> bool:
    """Drive `search` with `measure(rate)` (a step of load); False when `stop(rate)` cut it short
    before that step (`melange.tools.endpoint` stops before a step that would not fit the budget)."""
    while (rate := search.next_rate()) is not None:
        if stop is not None and stop(rate):
            return False
        search.record(await measure(rate))
    return True


# --- the budget -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """`--max-duration`: the seconds a run may take, from `started` (a monotonic clock)."""

    started: float
    seconds: float | None  # None: no limit

    def fits(self, now: float, needed: float) -> bool:
        """Whether something that takes `needed` seconds can still finish within the budget."""
        return self.seconds is None or now - self.started + needed <= self.seconds


# --- the document (the output file and the resume state) ---------------------------------------------


@dataclass(frozen=True)
class Conditions:
    """What a measurement depends on: a rerun may resume only when all of these are the same."""

    endpoint: str
    model: str
    tpot_seconds: float
    percentile: float
    input_edges: tuple[int, ...]
    output_edges: tuple[int, ...]
    size_point: SizePoint
    arrivals: Arrivals

    def as_record(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "servedModel": self.model,
            "percentile": self.percentile,
            "sizePoint": self.size_point,
            "arrivals": self.arrivals,
        }

    def mismatches(self, document: Mapping[str, Any]) -> list[str]:
        """How a saved document's conditions differ from these (empty: it can be resumed)."""
        measurement = document.get("measurement")
        measurement = measurement if isinstance(measurement, Mapping) else {}
        saved_buckets = document.get("buckets")
        saved_buckets = saved_buckets if isinstance(saved_buckets, Mapping) else {}
        saved = {
            "URL": measurement.get("endpoint"),
            "--model": measurement.get("servedModel"),
            "--tpot-slo": document.get("tpotSeconds"),
            "--percentile": measurement.get("percentile"),
            "--input-edges": saved_buckets.get("inputTokens"),
            "--output-edges": saved_buckets.get("outputTokens"),
            "--size-point": measurement.get("sizePoint"),
            "--arrivals": measurement.get("arrivals"),
        }
        wanted = {
            "URL": self.endpoint,
            "--model": self.model,
            "--tpot-slo": self.tpot_seconds,
            "--percentile": self.percentile,
            "--input-edges": list(self.input_edges),
            "--output-edges": list(self.output_edges),
            "--size-point": self.size_point,
            "--arrivals": self.arrivals,
        }
        return [
            f"{key}: {_show(wanted[key])} now, {_show(saved[key])} in the file"
            for key in wanted
            if not _same(saved[key], wanted[key])
        ]


def _same(saved: Any, wanted: Any) -> bool:
    if isinstance(wanted, float) and isinstance(saved, int | float):
        return math.isclose(saved, wanted, rel_tol=1e-9)
    return bool(saved == wanted)


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "(none)" if value is None else str(value)


def _round(value: float) -> float:
    if value == 0 or not math.isfinite(value):
        return value
    digits = SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(abs(value)))
    return round(value, max(digits, 0))


_SLUG_INVALID = re.compile(r"[^a-z0-9._-]+")


def default_profile_name(model: str, gpu: str, tpot_seconds: float) -> str:
    """`meta-llama/Llama-3.1-8B` on `L4` at 0.04 s -> `meta-llama/llama-3.1-8b/l4/tpot-40ms`."""
    parts = [
        _SLUG_INVALID.sub("-", part.lower()).strip("-._") or "x"
        for part in [*model.split("/"), gpu]
    ]
    return "/".join([*parts, f"tpot-{tpot_seconds * 1000:g}ms"])


@dataclass(frozen=True)
class Meta:
    """What the profile is for, as given on the command line (not conditions of the measurement)."""

    profile: str
    gpu: str
    cost_per_hour: float
    model: str  # the model named in the profile (by default the served model)
    tool: str  # e.g. "melange 0.1.0"


def new_document(meta: Meta, conditions: Conditions) -> dict[str, Any]:
    """A document with every bucket pending."""
    rows, columns = len(conditions.input_edges) - 1, len(conditions.output_edges) - 1
    return {
        "profile": meta.profile,
        "name": meta.gpu,
        "costPerHour": meta.cost_per_hour,
        "model": meta.model,
        "tpotSeconds": conditions.tpot_seconds,
        "buckets": {
            "inputTokens": list(conditions.input_edges),
            "outputTokens": list(conditions.output_edges),
        },
        "source": "measured",
        "throughput": [[None] * columns for _ in range(rows)],
        "description": (
            f"Measured by `{meta.tool.split()[0]} profile` against {conditions.endpoint} "
            f"(model {conditions.model}): the highest request rate per bucket at which the "
            f"p{conditions.percentile:g} TPOT stays within {conditions.tpot_seconds * 1000:g} ms."
        ),
        "measurement": {
            "schemaVersion": SCHEMA_VERSION,
            "tool": meta.tool,
            **conditions.as_record(),
            "criteria": {
                "keepUp": KEEP_UP,
                "maxErrorFraction": MAX_ERROR_FRACTION,
                "search": "double from 1/unloaded latency while passing, then bisect",
            },
            "pending": [[i, j] for i in range(rows) for j in range(columns)],
            "buckets": [],
        },
    }


def update_meta(document: dict[str, Any], meta: Meta) -> None:
    """A resumed run may rename the profile or change its GPU name and price."""
    document["profile"] = meta.profile
    document["name"] = meta.gpu
    document["costPerHour"] = meta.cost_per_hour
    document["model"] = meta.model
    document["measurement"]["tool"] = meta.tool


def pending(document: Mapping[str, Any]) -> list[tuple[int, int]]:
    """The buckets still to measure, as (input row, output column)."""
    return [(int(i), int(j)) for i, j in document["measurement"]["pending"]]


@dataclass(frozen=True)
class BucketMeasurement:
    """One bucket's result, with what it took."""

    bucket: Bucket
    throughput: float
    prompt_tokens: int | None  # as the server counted them (None: not reported)
    completion_tokens: int | None  # of the unloaded request
    unloaded_ttft: float
    unloaded_tpot: float
    steps: list[tuple[StepResult, str | None]]
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_record(self) -> dict[str, Any]:
        passing = [s for s, v in self.steps if v is None and s.rate == self.throughput]
        record: dict[str, Any] = {
            "inputTokens": list(self.bucket.inputs),
            "outputTokens": list(self.bucket.outputs),
            "requestInputTokens": self.bucket.prompt_tokens,
            "requestOutputTokens": self.bucket.output_tokens,
            "promptTokens": self.prompt_tokens,
            "completionTokens": self.completion_tokens,
            "throughput": _round(self.throughput),
            "tpotSeconds": None
            if not passing or passing[0].tpot is None
            else _round(passing[0].tpot),
            "unloaded": {
                "ttftSeconds": _round(self.unloaded_ttft),
                "tpotSeconds": _round(self.unloaded_tpot),
            },
            "steps": [
                {**s.as_record(), "passed": v is None, **({"why": v} if v else {})}
                for s, v in self.steps
            ],
        }
        if self.note:
            record["note"] = self.note
        record.update(self.extra)
        return record


def record_bucket(document: dict[str, Any], result: BucketMeasurement) -> None:
    """Put a measured bucket into the document and take it off the pending list."""
    i, j = result.bucket.row, result.bucket.column
    document["throughput"][i][j] = _round(result.throughput)
    measurement = document["measurement"]
    measurement["pending"] = [p for p in measurement["pending"] if list(p) != [i, j]]
    measurement["buckets"] = [
        b
        for b in measurement["buckets"]
        if (b["inputTokens"], b["outputTokens"])
        != (list(result.bucket.inputs), list(result.bucket.outputs))
    ] + [result.as_record()]


def set_conditions(document: dict[str, Any], **fields: Any) -> None:
    """Record run-wide facts found while measuring (e.g. how prompt lengths were set)."""
    document["measurement"].update(fields)


def finish_document(document: dict[str, Any], date: str) -> dict[str, Any]:
    """The complete profile: no pending list, the date; raises ProfileError if it is not valid."""
    if document["measurement"]["pending"]:
        raise ValueError(f"{len(document['measurement']['pending'])} buckets are still pending")
    final = {**document, "measurement": dict(document["measurement"])}
    del final["measurement"]["pending"]
    final["measurement"]["date"] = date
    order = {
        (tuple(b["inputTokens"]), tuple(b["outputTokens"])): b
        for b in final["measurement"]["buckets"]
    }
    final["measurement"]["buckets"] = [order[k] for k in sorted(order)]
    errors = profiles.validate_profile(final)
    if errors:
        raise profiles.ProfileError(errors)
    return final


def is_finished(document: Mapping[str, Any]) -> bool:
    measurement = document.get("measurement")
    return isinstance(measurement, Mapping) and "pending" not in measurement


def partial_header(document: Mapping[str, Any]) -> str:
    total = sum(len(row) for row in document["throughput"])
    left = len(document["measurement"]["pending"])
    return (
        f"# PARTIAL: {total - left} of {total} buckets measured by `melange profile`; run the same\n"
        "# command again to resume. Not a profile yet: `melange profiles import` refuses it.\n"
    )
