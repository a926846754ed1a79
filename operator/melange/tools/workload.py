"""From a request log to the `buckets` and `workload` blocks of a `MelangeAllocation` spec.

A log holds one request per line, as JSON Lines (`.jsonl`, `.ndjson`, `.json`) or CSV with a header
row (`.csv`); any other name is recognised by its first non-blank line (`{` means JSON Lines). Each
request gives its input and output token counts, and optionally when it arrived:

- `input_tokens` / `output_tokens`, or OpenAI's `prompt_tokens` / `completion_tokens`, at the top
  level or (JSON Lines) nested under `usage`, as OpenAI responses carry them;
- `timestamp`: epoch seconds (a number) or an RFC 3339 date-time with an offset.

The distribution is the matrix of request **counts** per bucket (the spec accepts any scale). A
bucket is `[edges[k], edges[k+1])` tokens; a request below the first edge or at/above the last
edge of either axis lies outside every bucket: it is counted, reported and left out of the matrix
(an open last bucket would have no upper size to profile a GPU at). Lines that cannot be read are
counted and reported with their line numbers, never dropped silently.

The total rate is the rate of the requests in the matrix: `(n - 1) / (last - first timestamp)` over
all `n` readable requests (n requests span n - 1 gaps), times the share that falls inside the
edges. It needs a timestamp on every readable request; otherwise the caller gives the rate.

Memory does not grow with the log: lines are streamed. Without edges, the edges come from exact
quantiles of the token counts, found in a first pass that keeps a count per distinct token count
(bounded by the largest token count, i.e. the model's context length, not by the number of lines);
a second pass then fills the matrix. Standard input is first spooled to a temporary file.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import tempfile
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

Format = Literal["jsonl", "csv"]

INPUT_FIELDS = ("input_tokens", "prompt_tokens")
OUTPUT_FIELDS = ("output_tokens", "completion_tokens")
TIMESTAMP_FIELD = "timestamp"
MAX_LISTED_BAD_LINES = 10
JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
CSV_SUFFIXES = {".csv"}
RATE_SIGNIFICANT_DIGITS = 6
MAX_LINE_BYTES = 16 << 20  # a request record longer than this is a bad line, not read whole
_decode = json.JSONDecoder().decode


class WorkloadError(ValueError):
    """The log cannot give a workload (unreadable, no usable request, no rate); one clear line."""


class Request(NamedTuple):
    input_tokens: int
    output_tokens: int
    timestamp: float | None


@dataclass(frozen=True)
class BadLine:
    line: int
    reason: str


@dataclass
class Scan:
    """What one pass over the log found (before binning)."""

    lines: int = 0  # non-blank data lines (CSV: without the header)
    bad: int = 0
    bad_lines: list[BadLine] = field(default_factory=list)
    requests: int = 0
    untimed: int = 0  # readable requests without a timestamp
    first: float = math.inf
    last: float = -math.inf

    def add_bad(self, line: int, reason: str) -> None:
        self.bad += 1
        if len(self.bad_lines) < MAX_LISTED_BAD_LINES:
            self.bad_lines.append(BadLine(line, reason))

    def add(self, request: Request) -> None:
        self.requests += 1
        if request.timestamp is None:
            self.untimed += 1
        else:
            self.first = min(self.first, request.timestamp)
            self.last = max(self.last, request.timestamp)


@dataclass(frozen=True)
class Workload:
    """The result: edges, the count matrix, the rate, and what was left out."""

    input_edges: list[int]
    output_edges: list[int]
    counts: list[list[int]]
    total_rate: float
    rate_from: Literal["timestamps", "option"]
    scan: Scan
    outside: int  # readable requests outside the edges, left out of the matrix
    outside_input: int  # ... of which below/above the input edges
    outside_output: int  # ... of which below/above the output edges (and inside the input edges)
    max_input: int
    max_output: int

    @property
    def binned(self) -> int:
        return sum(map(sum, self.counts))

    def spec_fragment(self) -> dict[str, Any]:
        """The `buckets` and `workload` blocks, to paste into a spec."""
        return {
            "buckets": {"inputTokens": self.input_edges, "outputTokens": self.output_edges},
            "workload": {"distribution": self.counts, "totalRate": self.total_rate},
        }


# --- reading one request -------------------------------------------------------------------------


def _tokens(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name}: must be a non-negative integer, got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    else:
        raise ValueError(f"{name}: must be a non-negative integer, got {value!r}")
    if number < 0:
        raise ValueError(f"{name}: must be a non-negative integer, got {value!r}")
    return number


def parse_timestamp(value: Any) -> float:
    """Epoch seconds (number or numeric string) or RFC 3339 (`2024-05-01T12:00:00.5Z`)."""
    if isinstance(value, bool):
        raise ValueError(f"timestamp: must be epoch seconds or RFC 3339, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            try:
                moment = datetime.fromisoformat(text)
            except ValueError:
                raise ValueError(
                    f"timestamp: must be epoch seconds or RFC 3339, got {value!r}"
                ) from None
            if moment.tzinfo is None:
                raise ValueError(
                    f"timestamp: RFC 3339 needs an offset (Z or +hh:mm), got {value!r}"
                ) from None
            seconds = moment.timestamp()
    else:
        raise ValueError(f"timestamp: must be epoch seconds or RFC 3339, got {value!r}")
    if not math.isfinite(seconds):
        raise ValueError(f"timestamp: must be finite, got {value!r}")
    return seconds


def _field(places: Sequence[Mapping[str, Any]], names: Sequence[str]) -> int:
    for place in places:
        for name in names:
            value = place.get(name)
            if value is not None and value != "":
                if type(value) is int and value >= 0:  # the common case, fast
                    return value
                return _tokens(value, name)
    raise ValueError(f"no {' or '.join(names)} field")


def request_from_record(record: Any) -> Request:
    """A request from a decoded JSON object or CSV row; `ValueError` says what is wrong."""
    if not isinstance(record, dict | Mapping):
        raise ValueError(f"must be a JSON object, got {type(record).__name__}")
    usage = record.get("usage")
    places = (record, usage) if isinstance(usage, dict | Mapping) else (record,)
    input_tokens = _field(places, INPUT_FIELDS)
    output_tokens = _field(places, OUTPUT_FIELDS)
    stamp = record.get(TIMESTAMP_FIELD)
    if stamp is None or stamp == "":
        return Request(input_tokens, output_tokens, None)
    if type(stamp) is float or type(stamp) is int:
        if not math.isfinite(stamp):
            raise ValueError(f"timestamp: must be finite, got {stamp!r}")
        return Request(input_tokens, output_tokens, float(stamp))
    return Request(input_tokens, output_tokens, parse_timestamp(stamp))


# --- reading a log --------------------------------------------------------------------------------


def detect_format(path: Path | None, first_line: str) -> Format:
    """By the file name's suffix, else by the first non-blank line (`{` starts JSON Lines)."""
    if path is not None:
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            return "jsonl"
        if suffix in CSV_SUFFIXES:
            return "csv"
    return "jsonl" if first_line.lstrip().startswith("{") else "csv"


Progress = Callable[[int], None]  # called with the number of bytes just read


def _raw_lines(raw: IO[bytes]) -> Iterator[tuple[bytes, int]]:
    """(line, its size in bytes) per line; a line longer than MAX_LINE_BYTES is read past in
    pieces and given as b"" with its size, so that no line is held in memory whole."""
    while True:
        line = raw.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
            yield line, len(line)
            continue
        size = len(line)
        while line and not line.endswith(b"\n"):
            line = raw.readline(1 << 20)
            size += len(line)
        yield b"", size


def _decoded(raw: IO[bytes], progress: Progress | None) -> Iterator[tuple[int, str | None]]:
    """(line number, text) per line; text is None when the bytes are not UTF-8 or the line is
    longer than MAX_LINE_BYTES."""
    pending = 0
    for number, (chunk, size) in enumerate(_raw_lines(raw), start=1):
        pending += size
        if progress is not None and pending >= 1 << 20:
            progress(pending)
            pending = 0
        if not chunk:
            yield number, None
            continue
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError:
            yield number, None
            continue
        yield number, text.removeprefix("\ufeff") if number == 1 else text
    if progress is not None and pending:
        progress(pending)


def _jsonl_requests(
    lines: Iterator[tuple[int, str | None]], scan: Scan
) -> Iterator[tuple[int, Request]]:
    for number, text in lines:
        if text is None:
            scan.lines += 1
            scan.add_bad(number, f"not UTF-8 text, or longer than {MAX_LINE_BYTES >> 20} MiB")
            continue
        if not text.strip():
            continue
        scan.lines += 1
        try:
            record = _decode(text)
        except ValueError as exc:
            scan.add_bad(number, f"not valid JSON: {exc}")
            continue
        try:
            yield number, request_from_record(record)
        except ValueError as exc:
            scan.add_bad(number, str(exc))


def _csv_requests(
    lines: Iterator[tuple[int, str | None]], scan: Scan
) -> Iterator[tuple[int, Request]]:
    # csv needs text; undecodable lines become an empty line (skipped) and are reported here
    def texts() -> Iterator[str]:
        for number, text in lines:
            if text is None:
                scan.lines += 1
                scan.add_bad(number, f"not UTF-8 text, or longer than {MAX_LINE_BYTES >> 20} MiB")
                yield "\n"
            else:
                yield text

    reader = csv.reader(texts())
    header: list[str] | None = None
    for row in reader:
        number = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.strip().lower() for cell in row]
            if not any(n in header for n in INPUT_FIELDS) or not any(
                n in header for n in OUTPUT_FIELDS
            ):
                raise WorkloadError(
                    f"line {number}: a CSV header must name the token columns "
                    f"({'/'.join(INPUT_FIELDS)} and {'/'.join(OUTPUT_FIELDS)}), got {row}"
                )
            continue
        scan.lines += 1
        if len(row) != len(header):
            scan.add_bad(number, f"has {len(row)} fields, the header has {len(header)}")
            continue
        try:
            yield number, request_from_record(dict(zip(header, row, strict=True)))
        except ValueError as exc:
            scan.add_bad(number, str(exc))


def read_requests(
    raw: IO[bytes], fmt: Format, scan: Scan, progress: Progress | None = None
) -> Iterator[tuple[int, Request]]:
    """Stream the readable requests of a log; bad lines are recorded in `scan`."""
    lines = _decoded(raw, progress)
    reader = _jsonl_requests if fmt == "jsonl" else _csv_requests
    for number, request in reader(lines, scan):
        scan.add(request)
        yield number, request


# --- edges and binning ----------------------------------------------------------------------------


def quantile_edges(values: Mapping[int, int], buckets: int) -> list[int]:
    """Edges for about `buckets` equally full buckets from a count per token value.

    The first edge is 1 and the last is the largest value + 1, so every value >= 1 lies inside.
    Edge k is the smallest integer v such that at least k/buckets of the values are below v; equal
    edges (many requests of one size) merge, so there may be fewer buckets than asked.
    """
    if buckets < 1:
        raise ValueError("buckets must be >= 1")
    counted = sorted((v, c) for v, c in values.items() if v >= 1 and c > 0)
    if not counted:
        raise WorkloadError("no request has a token count >= 1 to compute quantile edges from")
    total = sum(c for _, c in counted)
    top = counted[-1][0] + 1
    edges = [1]
    below = 0  # how many values are below value + 1
    k = 1
    for value, count in counted:
        below += count
        while k < buckets and below >= k * total / buckets:
            if edges[-1] < value + 1 < top:
                edges.append(value + 1)
            k += 1
    edges.append(top)
    return edges


def _span_rate(scan: Scan) -> float | None:
    if scan.requests < 2 or scan.untimed or not scan.last > scan.first:
        return None
    return (scan.requests - 1) / (scan.last - scan.first)


def _round_significant(value: float, digits: int = RATE_SIGNIFICANT_DIGITS) -> float:
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


ProgressFactory = Callable[[str, int], AbstractContextManager[Progress | None]]


def _no_progress(_label: str, _total: int) -> AbstractContextManager[Progress | None]:
    return nullcontext(None)


@contextmanager
def _pass(
    raw: IO[bytes], fmt: Format, label: str, size: int, progress: ProgressFactory
) -> Iterator[tuple[Scan, Iterator[tuple[int, Request]]]]:
    raw.seek(0)
    scan = Scan()
    with progress(label, size) as tick:
        yield scan, read_requests(raw, fmt, scan, tick)


def _spool(stream: IO[bytes], spool: IO[bytes]) -> None:
    """Copy standard input to the temporary file both passes read; a full disk is the user's to
    know about (and a file argument avoids the copy), not a traceback."""
    try:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            spool.write(chunk)
        spool.flush()
    except OSError as exc:
        raise WorkloadError(
            f"cannot copy it to a temporary file in {tempfile.gettempdir()} "
            f"({exc.strerror or exc}); give the log as a file instead of on stdin"
        ) from None


def _first_text(raw: IO[bytes]) -> str:
    raw.seek(0)
    for chunk, _ in _raw_lines(raw):
        text = chunk.decode("utf-8", errors="replace").removeprefix("\ufeff")
        if text.strip():
            return text
    return ""


def build_workload(
    source: Path | None,
    *,
    input_edges: list[int] | None = None,
    output_edges: list[int] | None = None,
    buckets: int = 8,
    rate: float | None = None,
    progress: ProgressFactory = _no_progress,
) -> Workload:
    """Read the log at `source` (None: stdin, spooled to a temporary file) and bin it.

    Edges not given come from quantiles (`buckets` per axis), which takes two passes over the file.
    `rate` (req/s) overrides the rate from the timestamps. Raises `WorkloadError`.
    """
    where = "<stdin>" if source is None else str(source)
    try:
        raw: IO[bytes] = tempfile.TemporaryFile() if source is None else source.open("rb")  # noqa: SIM115
    except OSError as exc:
        raise WorkloadError(f"{where}: cannot read: {exc.strerror or exc}") from None
    try:
        with raw:
            if source is None:
                _spool(sys.stdin.buffer, raw)
            fmt = detect_format(source, _first_text(raw))
            size = os.fstat(raw.fileno()).st_size
            if input_edges is None or output_edges is None:
                input_values: Counter[int] = Counter()
                output_values: Counter[int] = Counter()
                with _pass(raw, fmt, "reading (edges)", size, progress) as (_, requests):
                    for _number, request in requests:
                        input_values[request.input_tokens] += 1
                        output_values[request.output_tokens] += 1
                if input_edges is None:
                    input_edges = quantile_edges(input_values, buckets)
                if output_edges is None:
                    output_edges = quantile_edges(output_values, buckets)
                del input_values, output_values

            counts = [[0] * (len(output_edges) - 1) for _ in range(len(input_edges) - 1)]
            rows, cols = len(counts), len(counts[0])
            outside_input = outside_output = max_input = max_output = 0
            with _pass(raw, fmt, "binning", size, progress) as (scan, requests):
                for _number, request in requests:
                    i = bisect_right(input_edges, request.input_tokens) - 1
                    j = bisect_right(output_edges, request.output_tokens) - 1
                    max_input = max(max_input, request.input_tokens)
                    max_output = max(max_output, request.output_tokens)
                    if not 0 <= i < rows:
                        outside_input += 1
                    elif not 0 <= j < cols:
                        outside_output += 1
                    else:
                        counts[i][j] += 1
    except WorkloadError as exc:
        raise WorkloadError(f"{where}: {exc}") from None

    if scan.requests == 0:
        if scan.lines == 0:
            raise WorkloadError(f"{where}: holds no requests")
        raise WorkloadError(f"{where}: none of its {scan.lines} lines is a readable request")
    outside = outside_input + outside_output
    binned = scan.requests - outside
    if binned == 0:
        raise WorkloadError(
            f"{where}: all {scan.requests} requests lie outside the bucket edges (largest input "
            f"{max_input}, output {max_output} tokens)"
        )
    if rate is None:
        span_rate = _span_rate(scan)
        if span_rate is None:
            raise WorkloadError(_why_no_rate(scan))
        total_rate = _round_significant(span_rate * binned / scan.requests)
        rate_from: Literal["timestamps", "option"] = "timestamps"
    else:
        total_rate, rate_from = rate, "option"
    return Workload(
        input_edges=list(input_edges),
        output_edges=list(output_edges),
        counts=counts,
        total_rate=total_rate,
        rate_from=rate_from,
        scan=scan,
        outside=outside,
        outside_input=outside_input,
        outside_output=outside_output,
        max_input=max_input,
        max_output=max_output,
    )


def _why_no_rate(scan: Scan) -> str:
    if scan.untimed == scan.requests:
        reason = "the requests have no timestamp"
    elif scan.untimed:
        reason = f"{scan.untimed} of the {scan.requests} requests have no timestamp"
    elif scan.requests < 2:
        reason = "one request gives no time span"
    else:
        reason = "all timestamps are equal"
    return f"a total rate is needed: {reason}; give it with --rate (req/s)"


def summary_lines(workload: Workload, source: str) -> list[str]:
    """What the log held, for humans (stderr, and a comment atop the YAML output)."""
    scan = workload.scan
    lines = [
        f"{source}: {scan.lines} lines, {scan.requests} requests, {workload.binned} in the "
        f"matrix (distribution = request counts), totalRate {workload.total_rate:g} req/s "
        f"(from the {workload.rate_from if workload.rate_from == 'timestamps' else '--rate'})"
    ]
    if scan.bad:
        lines.append(f"{scan.bad} unreadable lines left out")
    if workload.outside:
        lines.append(
            f"{workload.outside} requests outside the edges left out: {workload.outside_input} "
            f"by input (edges {workload.input_edges[0]}..{workload.input_edges[-1]}, largest "
            f"{workload.max_input}), {workload.outside_output} by output (edges "
            f"{workload.output_edges[0]}..{workload.output_edges[-1]}, largest "
            f"{workload.max_output})"
        )
    return lines


def warning_lines(workload: Workload, source: str) -> list[str]:
    """The problems to report on stderr: bad lines (the first few, with numbers) and exclusions."""
    scan = workload.scan
    out = [f"{source}:{bad.line}: {bad.reason}" for bad in scan.bad_lines]
    if scan.bad:
        listed = f"the first {len(scan.bad_lines)} listed" if scan.bad > len(scan.bad_lines) else ""
        out.append(
            f"{scan.bad} of {scan.lines} lines are not readable requests and were left out"
            + (f" ({listed})" if listed else "")
        )
    if workload.outside:
        out.append(summary_lines(workload, source)[-1])
    return out
