"""A discrete-event simulation of a serving fleet: does a plan meet its SLO once requests vary?

A plan is sized with fluid averages: every request of a bucket is its representative size, every
instance holds its bucket's mean batch. This module replays requests one by one, each of its own
size, arriving at random, through a router and continuous-batching engines, and measures what a
client would: time to first token (TTFT), time per output token after the first (TPOT) and the
share of requests whose TPOT is within the SLO of the type that served them.

**The engine** (per instance, vLLM-like): each iteration produces one token for every decoding
sequence and processes a chunk of the waiting prompts (chunked prefill); it takes

    host + max(memory, compute)
    host    = fixed + per_sequence * decoding + per_request * admitted
              + per_context_token * context + per_prefill_token * prefill_tokens
    memory  = memory_fixed + memory_per_context_token * context
    compute = compute_per_sequence * decoding + compute_per_context_token * context
              + compute_per_prefill_token * prefill_tokens + compute_per_prefill_square * square

seconds, where `context` is the tokens the decoding sequences hold (prompt plus generated) and
`square` the prompt chunk's causal attention (`(s + c)^2 - s^2` for `c` tokens from position `s`).
At most `max_num_seqs` sequences run, and a request is admitted only while the KV cache holds its
mean footprint (input + output / 2 tokens, the profiles' own average context; no preemption is
modelled). The prefill chunk is as large as keeps the iteration within the TPOT SLO (the scheduler
the profiles assume: perfmodel's "prefill chunks sized to keep each step within the SLO"), and
never smaller than `min_prefill_share` of the SLO (a quarter) of prompt work: the tokens whose own
seconds (their compute, or for a fitted engine their host time) are that share, added to the
iteration as the roofline adds them, so free while the decoding batch's weight and KV-cache reads
still hide them. Waiting prompts thus always progress, so admission does not wait for the batch
to fit the SLO, and an overloaded engine grows its batch up to `max_num_seqs` (or its KV cache)
and misses the SLO, as vLLM does with its fixed budget of tokens per step (decodes first, then
prompt chunks in what is left of `max_num_batched_tokens`), instead of holding every request in
the queue. The least is a quantity of prompt work, as vLLM's budget is a number of tokens, not of
time added to the decoding batch's own seconds: a memory-bound batch near the SLO (long contexts
filling the KV cache, as at a profile's KV-bound maximum) leaves compute idle under its reads, and
the prompt tokens that fill it keep the iteration within the SLO, where a quarter of the SLO added
to the batch's own seconds would take every such iteration past it at loads the profile serves.

A sequence's first token comes at the end of the iteration that finishes its prompt; TPOT is
`(finish - first token) / (output - 1)` (as `melange profile` measures it), so requests of one
output token have none and are left out of TPOT percentiles and of the SLO attainment. TPOT alone
does not see a queue where the batch cap or the KV cache, not the SLO, limits a type's throughput
(an overloaded engine then keeps its TPOT and lets requests wait): so with a `ttft_slo` the share
of requests within both (TPOT within the SLO, TTFT within `ttft_slo`) is reported too.

**Calibration**, per GPU type, so that the engine's fluid maximum throughput at the SLO per bucket
matches the profile's throughput matrix:

* a profile built by `melange.tools.perfmodel` (a shipped estimate: a spec's GPU entry is matched
  to it by name, edges and matrix, and the profile records the model's inputs) gives the
  iteration terms directly: weights and KV cache read at the
  effective bandwidth (memory), 2 * params FLOPs per token plus attention at the effective FLOP/s
  (compute), the engine's host overheads (host), its KV budget and batch cap. The engine's fluid
  throughput is then the profile's formula, term for term (`fluid_throughput`);
* any other matrix (a measured profile) is fitted with host terms only (the form
  `tests/e2e/gpusim.py` serves, with this module's `Instance` as its engine, so a fitted engine
  can be run over real HTTP too): in steady state at the SLO a batch of
  `B = T * O * SLO` sequences runs each step, so every served bucket gives one linear equation
  `(SLO - fixed) / B = per_sequence + per_request / O + per_context_token * (I + O / 2) +
  per_prefill_token * I / O` (or the batch cap's, when `B > max_num_seqs`). They are solved by
  non-negative least squares in relative error, for a grid of `fixed`, and the best fit is kept; its
  largest relative error against the matrix is reported (`Engine.fit_error`), because a measured
  matrix need not follow any such form.

**Routing**: `size-aware` asks a chooser (a routing table's `pick`, `melange.plan.routing.chooser`;
this module depends on no router) for the type by input length (`size-aware-output`: and output
length), then sends the request to that type's instance with the fewest outstanding requests;
`round-robin` sends it to every instance in turn, whatever its type and the request's size.

Request sizes within a bucket are log-uniform (their mean is the profiles' representative size,
`perfmodel.representative_size`). Everything is deterministic for a seed. Pure: no I/O.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from melange.tools import perfmodel

Chooser = Callable[[int, int | None, float], str]
"""A GPU type for a request: (input tokens, output tokens or None when unknown, uniform draw)."""
Routing = Literal["size-aware", "size-aware-output", "round-robin"]
ROUTINGS: tuple[Routing, ...] = get_args(Routing)
DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_MIN_PREFILL_SHARE = 0.25  # of the SLO: the least prompt work an iteration does
MAX_PREFILL_TOKENS = 8192  # a chunk when nothing decodes (vLLM's max_num_batched_tokens order)
_FIXED_GRID = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6)
_SLO_TOLERANCE = 1e-9
PERCENTILES = (50, 90, 99)

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]


@dataclass(frozen=True)
class IterationModel:
    """Seconds per engine iteration (see the module docstring for the formula)."""

    fixed: float = 0.0
    per_sequence: float = 0.0
    per_request: float = 0.0
    per_context_token: float = 0.0
    per_prefill_token: float = 0.0
    memory_fixed: float = 0.0
    memory_per_context_token: float = 0.0
    compute_per_sequence: float = 0.0
    compute_per_context_token: float = 0.0
    compute_per_prefill_token: float = 0.0
    compute_per_prefill_square: float = 0.0

    def seconds(
        self, decoding: int, context: float, admitted: int, prefill: float, square: float
    ) -> float:
        host = (
            self.fixed
            + self.per_sequence * decoding
            + self.per_request * admitted
            + self.per_context_token * context
            + self.per_prefill_token * prefill
        )
        memory = self.memory_fixed + self.memory_per_context_token * context
        compute = (
            self.compute_per_sequence * decoding
            + self.compute_per_context_token * context
            + self.compute_per_prefill_token * prefill
            + self.compute_per_prefill_square * square
        )
        return host + max(memory, compute)


@dataclass(frozen=True)
class Engine:
    """One GPU type as simulated: its engine, its SLO, and the profile it was calibrated to."""

    name: str
    cost_per_hour: float
    tpot_slo: float
    iteration: IterationModel
    input_edges: tuple[int, ...]
    output_edges: tuple[int, ...]
    throughput: tuple[tuple[float, ...], ...]  # the profile's, for load accounting
    calibration: Literal["perfmodel", "fitted"]
    fit_error: float  # largest relative error of fluid_throughput against the profile
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    kv_capacity_tokens: float = math.inf
    min_prefill_share: float = DEFAULT_MIN_PREFILL_SHARE


def fluid_throughput(
    iteration: IterationModel,
    input_tokens: float,
    output_tokens: float,
    tpot_slo: float,
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
    kv_capacity_tokens: float = math.inf,
) -> float:
    """The engine's max req/s at the SLO for requests of one size, in the steady-state averages
    the profiles use: a batch B decoding at mean context I + O/2, B/O requests admitted and B*I/O
    prompt tokens per step. For a perfmodel-derived engine this is perfmodel's own formula."""
    i, o = float(input_tokens), float(output_tokens)
    ctx = i + o / 2
    host = (
        iteration.per_sequence
        + iteration.per_request / o
        + iteration.per_context_token * ctx
        + iteration.per_prefill_token * i / o
    )
    memory = iteration.memory_per_context_token * ctx
    compute = (
        iteration.compute_per_sequence
        + iteration.compute_per_context_token * ctx
        + iteration.compute_per_prefill_token * i / o
        + iteration.compute_per_prefill_square * i * i / o
    )

    def step(batch: float) -> float:
        return (
            iteration.fixed
            + batch * host
            + max(iteration.memory_fixed + batch * memory, batch * compute)
        )

    limits = [float(max_num_seqs), kv_capacity_tokens / ctx]
    if host + memory > 0:
        limits.append((tpot_slo - iteration.fixed - iteration.memory_fixed) / (host + memory))
    if host + compute > 0:
        limits.append((tpot_slo - iteration.fixed) / (host + compute))
    batch = min(limits)
    if batch <= 0 or not math.isfinite(batch):
        return 0.0
    return batch / (o * step(batch))


def _representatives(edges: Sequence[int]) -> list[float]:
    return [perfmodel.representative_size(a, b) for a, b in itertools.pairwise(edges)]


def _fit_error(
    iteration: IterationModel,
    throughput: Sequence[Sequence[float]],
    input_edges: Sequence[int],
    output_edges: Sequence[int],
    tpot_slo: float,
    max_num_seqs: int,
    kv_capacity_tokens: float,
) -> float:
    worst = 0.0
    for i, row in zip(_representatives(input_edges), throughput, strict=True):
        for o, value in zip(_representatives(output_edges), row, strict=True):
            if value > 0:
                got = fluid_throughput(iteration, i, o, tpot_slo, max_num_seqs, kv_capacity_tokens)
                worst = max(worst, abs(got / value - 1.0))
    return worst


def _snake(fields: Mapping[str, Any]) -> dict[str, Any]:
    """`costPerHour` -> `cost_per_hour`: an estimate's camelCase record as dataclass fields."""
    out = {}
    for key, value in fields.items():
        out["".join(f"_{c.lower()}" if c.isupper() else c for c in key)] = value
    return out


def engine_from_estimate(
    name: str,
    cost_per_hour: float,
    throughput: Sequence[Sequence[float]],
    input_edges: Sequence[int],
    output_edges: Sequence[int],
    estimate: Mapping[str, Any],
) -> Engine:
    """The engine of a profile built by `melange.tools.perfmodel`, from the inputs it records.

    Raises ValueError (naming the field) when the record is not one perfmodel wrote."""
    try:
        gpu = perfmodel.GpuSpec(**_snake(estimate["gpu"]))
        model = perfmodel.ModelSpec(**_snake(estimate["model"]))
        engine = perfmodel.EngineSpec(**_snake(estimate["engine"]))
        slo = float(estimate["tpotSloSeconds"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"estimate: not a perfmodel record ({exc})") from None
    flops, bandwidth = gpu.effective_flops, gpu.effective_bandwidth
    attention = 2 * model.layers * model.hidden_size
    kv_budget = gpu.memory_bytes * (1 - engine.memory_reserve_fraction) - model.weight_bytes
    iteration = IterationModel(
        fixed=engine.step_overhead_seconds,
        per_sequence=engine.per_sequence_overhead_seconds,
        per_request=engine.per_request_overhead_seconds,
        memory_fixed=model.weight_bytes / bandwidth,
        memory_per_context_token=model.kv_bytes_per_token / bandwidth,
        compute_per_sequence=2 * model.params / flops,
        compute_per_context_token=2 * attention / flops,
        compute_per_prefill_token=2 * model.params / flops,
        compute_per_prefill_square=attention / flops,
    )
    capacity = max(kv_budget, 0.0) / model.kv_bytes_per_token
    return Engine(
        name=name,
        cost_per_hour=cost_per_hour,
        tpot_slo=slo,
        iteration=iteration,
        input_edges=tuple(input_edges),
        output_edges=tuple(output_edges),
        throughput=tuple(tuple(float(v) for v in row) for row in throughput),
        calibration="perfmodel",
        fit_error=_fit_error(
            iteration, throughput, input_edges, output_edges, slo, engine.max_batch_size, capacity
        ),
        max_num_seqs=engine.max_batch_size,
        kv_capacity_tokens=capacity,
    )


def _nnls(features: Floats, target: Floats) -> Floats:
    """Non-negative least squares for a handful of unknowns: the best of every active set."""
    best, best_residual = np.zeros(features.shape[1]), float(np.sum(target**2))
    columns = range(features.shape[1])
    for size in range(1, features.shape[1] + 1):
        for subset in itertools.combinations(columns, size):
            solution, *_ = np.linalg.lstsq(features[:, subset], target, rcond=None)
            if np.any(solution < 0):
                continue
            x = np.zeros(features.shape[1])
            x[list(subset)] = solution
            residual = float(np.sum((features @ x - target) ** 2))
            if residual < best_residual:
                best, best_residual = x, residual
    return best


def fit_engine(
    name: str,
    cost_per_hour: float,
    throughput: Sequence[Sequence[float]],
    input_edges: Sequence[int],
    output_edges: Sequence[int],
    tpot_slo: float,
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
) -> Engine:
    """An engine whose fluid throughput approximates `throughput` (see the module docstring)."""
    if not (tpot_slo > 0 and math.isfinite(tpot_slo)):
        raise ValueError(f"the TPOT SLO must be a positive number of seconds, got {tpot_slo}")
    cells = [
        (i, o, value)
        for i, row in zip(_representatives(input_edges), throughput, strict=True)
        for o, value in zip(_representatives(output_edges), row, strict=True)
        if value > 0
    ]
    if not cells:
        raise ValueError(f"{name}: the profile serves no bucket")
    features = np.array([[1.0, 1.0 / o, i + o / 2, i / o] for i, o, _ in cells])
    best: tuple[float, float, IterationModel] | None = None
    for share in _FIXED_GRID:
        fixed = share * tpot_slo
        targets = []
        for _, o, value in cells:
            batch = value * o * tpot_slo
            if batch <= max_num_seqs:
                targets.append((tpot_slo - fixed) / batch)
            else:  # the batch cap binds: a step of max_num_seqs takes max_num_seqs / (T * O)
                targets.append((max_num_seqs / (value * o) - fixed) / max_num_seqs)
        y = np.array(targets)
        if np.any(y <= 0):
            continue
        x = _nnls(features / y[:, None], np.ones(len(y)))
        iteration = IterationModel(
            fixed=fixed,
            per_sequence=float(x[0]),
            per_request=float(x[1]),
            per_context_token=float(x[2]),
            per_prefill_token=float(x[3]),
        )
        predicted = np.array(
            [fluid_throughput(iteration, i, o, tpot_slo, max_num_seqs) for i, o, _ in cells]
        )
        actual = np.array([value for _, _, value in cells])
        with np.errstate(divide="ignore"):
            score = float(np.sqrt(np.mean(np.log(np.maximum(predicted, 1e-300) / actual) ** 2)))
        error = float(np.max(np.abs(predicted / actual - 1.0)))
        if best is None or score < best[0]:
            best = (score, error, iteration)
    if best is None:
        raise ValueError(f"{name}: no engine fits the profile's throughput at this SLO")
    return Engine(
        name=name,
        cost_per_hour=cost_per_hour,
        tpot_slo=tpot_slo,
        iteration=best[2],
        input_edges=tuple(input_edges),
        output_edges=tuple(output_edges),
        throughput=tuple(tuple(float(v) for v in row) for row in throughput),
        calibration="fitted",
        fit_error=best[1],
        max_num_seqs=max_num_seqs,
    )


def matching_estimate(
    name: str,
    throughput: Sequence[Sequence[float]],
    input_edges: Sequence[int],
    output_edges: Sequence[int],
    profiles: Iterable[Mapping[str, Any]],
) -> Mapping[str, Any] | None:
    """The profile (of `profiles`) a spec's GPU entry was copied from: same type name, same bucket
    edges, same throughput matrix; None when none is. Only then is its `estimate` the engine's."""
    rows = [[float(v) for v in row] for row in throughput]
    for profile in profiles:
        buckets = profile.get("buckets") or {}
        if (
            profile.get("name") == name
            and list(buckets.get("inputTokens", ())) == list(input_edges)
            and list(buckets.get("outputTokens", ())) == list(output_edges)
            and [[float(v) for v in row] for row in profile.get("throughput", ())] == rows
            and isinstance(profile.get("estimate"), Mapping)
        ):
            return profile
    return None


# --- the trace ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trace:
    """Requests in arrival order: when (seconds from the start), and their token counts."""

    arrivals: Floats
    input_tokens: Ints
    output_tokens: Ints
    window: float = 0.0  # seconds the arrivals were drawn over (0: up to the last arrival)

    def __len__(self) -> int:
        return len(self.arrivals)

    @property
    def duration(self) -> float:
        """The span of traffic that rates and loads are measured over."""
        last = float(self.arrivals[-1]) if len(self.arrivals) else 0.0
        return max(self.window, last)


def _log_uniform(rng: np.random.Generator, low: Ints, high: Ints) -> Ints:
    """Integers in [low, high), spread evenly in log space."""
    value = np.exp(rng.uniform(np.log(low), np.log(high)))
    return np.clip(np.floor(value).astype(np.int64), low, high - 1)


def poisson_trace(
    input_edges: Sequence[int],
    output_edges: Sequence[int],
    rates: Sequence[Sequence[float]],
    duration: float,
    seed: int,
) -> Trace:
    """Poisson arrivals at the matrix's total rate for `duration` seconds; each request's bucket
    drawn by its rate, its sizes log-uniform within the bucket."""
    matrix = np.asarray(rates, dtype=np.float64)
    total = float(matrix.sum())
    rng = np.random.default_rng(seed)
    if total <= 0 or duration <= 0:
        empty = np.zeros(0, dtype=np.int64)
        return Trace(np.zeros(0), empty, empty, window=max(duration, 0.0))
    gaps: list[Floats] = []
    elapsed = 0.0
    while elapsed < duration:
        chunk = rng.exponential(1.0 / total, size=int(total * duration * 1.1) + 64)
        gaps.append(chunk)
        elapsed += float(chunk.sum())
    arrivals = np.cumsum(np.concatenate(gaps))
    arrivals = arrivals[arrivals < duration]
    n = len(arrivals)
    cells = rng.choice(matrix.size, size=n, p=(matrix / total).ravel())
    rows, cols = np.divmod(cells, matrix.shape[1])
    ins, outs = np.asarray(input_edges, dtype=np.int64), np.asarray(output_edges, dtype=np.int64)
    return Trace(
        arrivals,
        _log_uniform(rng, ins[rows], ins[rows + 1]),
        _log_uniform(rng, outs[cols], outs[cols + 1]),
        window=duration,
    )


def trace_of(
    requests: Iterable[tuple[int, int, float | None]],
    rate: float | None,
    seed: int,
) -> Trace:
    """A trace of logged requests (input tokens, output tokens, epoch timestamp or None): at their
    logged times from the first one when every request has one and `rate` is None, else in log
    order as Poisson arrivals at `rate`. Requests of no output token are left out."""
    kept = [(i, o, t) for i, o, t in requests if o >= 1]
    ins = np.array([max(i, 0) for i, _, _ in kept], dtype=np.int64)
    outs = np.array([o for _, o, _ in kept], dtype=np.int64)
    stamps = [t for _, _, t in kept]
    if rate is None and stamps and all(t is not None for t in stamps):
        times = np.array(stamps, dtype=np.float64)
        order = np.argsort(times, kind="stable")
        return Trace(times[order] - times[order][0], ins[order], outs[order])
    if rate is None or rate <= 0:
        raise ValueError("the log's requests lack timestamps: give a request rate")
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=len(kept)))
    return Trace(arrivals, ins, outs)


# --- the engine --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """Per request, filled in as the simulation runs (lists: indexing them is fast in a loop).

    A request is an index into these lists; whoever submits it appends its sizes first."""

    inputs: list[int]
    outputs: list[int]
    first: list[float]
    finish: list[float]
    k1: list[int]  # the iteration (of its instance) that gave the first token

    def add(self, input_tokens: int, output_tokens: int) -> int:
        """A new request of these sizes: its index."""
        self.inputs.append(input_tokens)
        self.outputs.append(output_tokens)
        self.first.append(math.nan)
        self.finish.append(math.nan)
        self.k1.append(0)
        return len(self.inputs) - 1


class Instance:
    """One engine's scheduler, advanced lazily: iterations run only up to the time the caller asks
    about. `simulate` drives it in simulated time; tests/e2e/gpusim.py drives the same scheduler in
    real time behind an HTTP server (`step`, `first_tokens`, `cancel`), so both are one model.

    The decoding sequences are kept as aggregates, so an iteration costs O(1) whatever the batch:
    a sequence whose first token came at the end of iteration k1 holds context I + (k - k1) during
    iteration k, so the batch's context is `offset + decoding * k` with `offset = sum(I - k1)`,
    and it finishes at the end of iteration k1 + O - 1 (a heap keyed by that iteration).
    """

    def __init__(self, engine: Engine, outcome: Outcome) -> None:
        self.engine = engine
        self.model = engine.iteration
        self.slo = engine.tpot_slo
        self.least = engine.min_prefill_share * engine.tpot_slo
        self.inputs = outcome.inputs
        self.outputs = outcome.outputs
        self.outcome = outcome
        self.waiting: deque[int] = deque()
        self.prefill: deque[list[int]] = deque()  # [request, tokens done]
        self.first_tokens: list[int] = []  # requests whose prompt the iteration in progress ends
        self.cancelled: set[int] = set()
        self.decoding = 0
        self.offset = 0  # sum over decoding sequences of (input - k1)
        self.finishing: list[tuple[int, int]] = []  # (last iteration, request)
        self.kv = 0.0
        self.k = 0
        self.busy = False
        self.end = 0.0

    @property
    def outstanding(self) -> int:
        return len(self.waiting) + len(self.prefill) + self.decoding

    def footprint(self, request: int) -> float:
        return self.inputs[request] + self.outputs[request] / 2

    def submit(self, request: int, now: float) -> None:
        """Queue a request; an idle engine starts an iteration at `now`."""
        self.waiting.append(request)
        if not self.busy:
            self._start(now)

    def advance(self, until: float) -> None:
        """Run every iteration that ends by `until`."""
        while self.busy and self.end <= until:
            self.step(self.end)

    def step(self, start: float) -> None:
        """End the iteration in progress (at `end`), and start the next at `start` (>= `end`)
        when there is work: a real-time driver's way to not catch up with a long stall."""
        if not self.busy:
            return
        self._finish()
        if self.waiting or self.prefill or self.decoding:
            self._start(max(start, self.end))
        else:
            self.busy = False

    def cancel(self, request: int) -> None:
        """Drop a request whose client went away, wherever it is, when the next iteration starts
        (its slot and KV cache are then free)."""
        self.cancelled.add(request)

    def _drop_cancelled(self) -> None:
        gone, outcome = self.cancelled, self.outcome
        self.waiting = deque(r for r in self.waiting if r not in gone)
        kept: deque[list[int]] = deque()
        for entry in self.prefill:
            if entry[0] in gone:
                self.kv -= self.footprint(entry[0])
            else:
                kept.append(entry)
        self.prefill = kept
        live = []
        for last, request in self.finishing:
            if request in gone:
                self.decoding -= 1
                self.offset -= self.inputs[request] - outcome.k1[request]
                self.kv -= self.footprint(request)
            else:
                live.append((last, request))
        heapq.heapify(live)
        self.finishing = live
        gone.clear()

    def _start(self, now: float) -> None:
        if self.cancelled:
            self._drop_cancelled()
        engine, model = self.engine, self.model
        admitted = 0
        while self.waiting and len(self.prefill) + self.decoding < engine.max_num_seqs:
            request = self.waiting[0]
            size = self.footprint(request)
            if self.kv + size > engine.kv_capacity_tokens and (self.prefill or self.decoding):
                break
            self.waiting.popleft()
            self.prefill.append([request, 0])
            self.kv += size
            admitted += 1
        n = self.decoding
        context = float(self.offset + n * self.k)
        # the host and compute seconds so far, then prompt chunks while they fit in the limit
        host = model.fixed + model.per_sequence * n + model.per_request * admitted
        host += model.per_context_token * context
        memory = model.memory_fixed + model.memory_per_context_token * context
        compute = model.compute_per_sequence * n + model.compute_per_context_token * context
        a, b, q = (
            model.per_prefill_token,
            model.compute_per_prefill_token,
            model.compute_per_prefill_square,
        )
        # the SLO, or while that leaves the prompts less than `least` seconds of their own work,
        # the iteration with `least` of it (free under the batch's reads while they hide it):
        # waiting prompts always progress
        limit = max(self.slo, host + max(memory, compute + self.least)) if n else math.inf
        cap = MAX_PREFILL_TOKENS if n == 0 else math.inf
        tokens = 0.0
        self.first_tokens = []
        for entry in self.prefill:
            request, done = entry
            left = self.inputs[request] - done
            fit = _fit(limit, host, memory, compute, a, b, q, done)
            take = max(int(min(left, fit, cap - tokens)), 0)
            if take <= 0 and tokens == 0 and left > 0:
                take = 1  # a token per iteration at least, whatever one costs
            if take <= 0 and left > 0:
                break
            host += a * take
            compute += b * take + q * ((done + take) ** 2 - done**2)
            tokens += take
            entry[1] = done + take
            if take < left:
                break
            self.first_tokens.append(request)
        self.end = now + host + max(memory, compute)
        self.busy = True

    def _finish(self) -> None:
        k, end, outcome = self.k, self.end, self.outcome
        finishing = self.finishing
        while finishing and finishing[0][0] == k:
            _, request = heapq.heappop(finishing)
            outcome.finish[request] = end
            self.decoding -= 1
            self.offset -= self.inputs[request] - outcome.k1[request]
            self.kv -= self.footprint(request)
        for request in self.first_tokens:  # a prefix of the prefill queue
            self.prefill.popleft()
            outcome.first[request] = end
            if self.outputs[request] <= 1:
                outcome.finish[request] = end
                self.kv -= self.footprint(request)
                continue
            outcome.k1[request] = k
            self.decoding += 1
            self.offset += self.inputs[request] - k
            heapq.heappush(finishing, (k + self.outputs[request] - 1, request))
        self.first_tokens = []
        self.k = k + 1


def _fit(
    limit: float, host: float, memory: float, compute: float, a: float, b: float, q: float, s: int
) -> float:
    """Prompt tokens from position `s` that keep an iteration within `limit` seconds."""
    room = limit - host
    if room - memory < 0 or room - compute < 0:
        return 0.0
    limits = []
    if a > 0:
        limits.append((room - memory) / a)
    # q c^2 + (a + b + 2 q s) c <= room - compute
    linear, free = a + b + 2 * q * s, room - compute
    if q > 0:
        limits.append((-linear + math.sqrt(linear * linear + 4 * q * free)) / (2 * q))
    elif linear > 0:
        limits.append(free / linear)
    return max(min(limits, default=math.inf), 0.0)


# --- the fleet ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """What clients of one GPU type (or of the whole fleet) saw."""

    name: str
    instances: int
    cost_per_hour: float
    requests: int
    load: float  # instances' worth of traffic by the profile (req/s over throughput), served
    ttft: tuple[float, ...]  # seconds, at PERCENTILES
    tpot: tuple[float, ...]  # seconds, at PERCENTILES
    within_slo: float  # share of requests with a TPOT (output >= 2 tokens) within the SLO
    within_slo_and_ttft: float  # ... and with a TTFT within ttft_slo (NaN without one)
    unservable: int = 0  # requests of buckets the type's profile cannot serve


@dataclass(frozen=True)
class Report:
    """What a simulation found: per GPU type, overall, and how each engine was calibrated."""

    routing: Routing
    duration: float
    requests: int
    total: Stats
    gpus: tuple[Stats, ...]
    calibration: tuple[tuple[str, str, float], ...] = ()  # (type, perfmodel | fitted, error)


def _percentiles(values: Floats) -> tuple[float, ...]:
    if len(values) == 0:
        return tuple(math.nan for _ in PERCENTILES)
    return tuple(float(v) for v in np.percentile(values, PERCENTILES))


def simulate(
    engines: Sequence[Engine],
    instances: Mapping[str, int],
    trace: Trace,
    routing: Routing,
    choose: Chooser | None = None,
    seed: int = 0,
    ttft_slo: float | None = None,
) -> Report:
    """Replay `trace` through the fleet: `instances[type]` engines of each type, routed by
    `routing`: size-aware, the type `choose` gives for the input length (and with
    `size-aware-output` the output length), then the least outstanding instance of it; or round
    robin over every instance, whatever its type and the request's size. `choose` is a routing
    table's `pick` (`melange.plan.routing.chooser`): the simulation depends on no router."""
    if routing not in ROUTINGS:
        raise ValueError(f"unknown routing {routing!r}; use one of {', '.join(ROUTINGS)}")
    if routing != "round-robin" and choose is None:
        raise ValueError(f"routing {routing} needs a routing table")
    by_name = {e.name: e for e in engines}
    unknown = sorted(set(instances) - set(by_name))
    if unknown:
        raise ValueError(f"no GPU type named {', '.join(unknown)}")
    n = len(trace)
    arrivals = trace.arrivals.tolist()
    inputs = trace.input_tokens.tolist()
    outputs = trace.output_tokens.tolist()
    outcome = Outcome(inputs, outputs, [math.nan] * n, [math.nan] * n, [0] * n)
    fleet = {
        engine.name: [Instance(engine, outcome) for _ in range(instances.get(engine.name, 0))]
        for engine in engines
    }
    everyone = [instance for engine in engines for instance in fleet[engine.name]]
    if n and not everyone:
        raise ValueError("the fleet has no instance to send requests to")
    rng = np.random.default_rng(seed)
    draws = rng.random(n)
    served = np.empty(n, dtype=np.int64)
    type_index = {e.name: g for g, e in enumerate(engines)}
    rotation = dict.fromkeys(fleet, 0)
    for r in range(n):
        now = arrivals[r]
        if routing == "round-robin":
            instance = everyone[r % len(everyone)]
            instance.advance(now)
            name = instance.engine.name
        else:
            assert choose is not None
            known = outputs[r] if routing == "size-aware-output" else None
            name = choose(inputs[r], known, float(draws[r]))
            members = fleet.get(name, [])
            if not members:
                raise ValueError(f"the router chose {name}, which has no instance")
            start = rotation[name]
            rotation[name] = (start + 1) % len(members)
            instance = members[start]
            best = None
            for step in range(len(members)):
                candidate = members[(start + step) % len(members)]
                candidate.advance(now)
                if best is None or candidate.outstanding < best:
                    instance, best = candidate, candidate.outstanding
        served[r] = type_index[name]
        instance.submit(r, now)
    for instance in everyone:
        instance.advance(math.inf)
    return _report(engines, fleet, trace, outcome, served, routing, ttft_slo)


def _report(
    engines: Sequence[Engine],
    fleet: Mapping[str, list[Instance]],
    trace: Trace,
    outcome: Outcome,
    served: Ints,
    routing: Routing,
    ttft_slo: float | None,
) -> Report:
    duration = max(trace.duration, 1e-9)
    first, finish = np.array(outcome.first), np.array(outcome.finish)
    ttft = first - trace.arrivals
    multi = trace.output_tokens >= 2
    tpot = np.full(len(trace), np.nan)
    tpot[multi] = (finish[multi] - first[multi]) / (trace.output_tokens[multi] - 1)
    slo = np.array([e.tpot_slo for e in engines])[served] if len(trace) else np.zeros(0)
    within = tpot <= slo * (1 + _SLO_TOLERANCE)
    both = (within | ~multi) & (ttft <= (math.inf if ttft_slo is None else ttft_slo))

    def share_both(mask: npt.NDArray[np.bool_]) -> float:
        return float(both[mask].mean()) if ttft_slo is not None and mask.any() else math.nan

    stats = []
    load_all = 0.0
    for g, engine in enumerate(engines):
        mine = served == g
        cost = len(fleet[engine.name]) * engine.cost_per_hour
        inverse, unservable = _inverse_load(engine, trace, mine)
        load_all += inverse
        stats.append(
            Stats(
                name=engine.name,
                instances=len(fleet[engine.name]),
                cost_per_hour=cost,
                requests=int(mine.sum()),
                load=inverse / duration,
                ttft=_percentiles(ttft[mine]),
                tpot=_percentiles(tpot[mine & multi]),
                within_slo=float(within[mine & multi].mean()) if (mine & multi).any() else math.nan,
                within_slo_and_ttft=share_both(mine),
                unservable=unservable,
            )
        )
    total = Stats(
        name="total",
        instances=sum(s.instances for s in stats),
        cost_per_hour=sum(s.cost_per_hour for s in stats),
        requests=len(trace),
        load=load_all / duration,
        ttft=_percentiles(ttft),
        tpot=_percentiles(tpot[multi]),
        within_slo=float(within[multi].mean()) if multi.any() else math.nan,
        within_slo_and_ttft=share_both(np.ones(len(trace), dtype=np.bool_)),
        unservable=sum(s.unservable for s in stats),
    )
    return Report(
        routing=routing,
        duration=trace.duration,
        requests=len(trace),
        total=total,
        gpus=tuple(stats),
        calibration=tuple((e.name, e.calibration, e.fit_error) for e in engines),
    )


def _inverse_load(engine: Engine, trace: Trace, mine: npt.NDArray[np.bool_]) -> tuple[float, int]:
    """Sum of 1 / profile throughput over the requests a type served (instance-seconds of work),
    and how many it served of buckets its profile gives no throughput for."""
    if not mine.any():
        return 0.0, 0
    ins = np.clip(
        np.searchsorted(engine.input_edges, trace.input_tokens[mine], side="right") - 1,
        0,
        len(engine.input_edges) - 2,
    )
    outs = np.clip(
        np.searchsorted(engine.output_edges, trace.output_tokens[mine], side="right") - 1,
        0,
        len(engine.output_edges) - 2,
    )
    matrix = np.asarray(engine.throughput, dtype=np.float64)[ins, outs]
    positive = matrix > 0
    return float(np.sum(1.0 / matrix[positive])), int((~positive).sum())
