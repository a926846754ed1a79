"""Operations benchmark: a day of traffic and a capacity outage through the operator's decisions.

    python benchmarks/operations.py [--seed 0] [--hours 24] [--startup-minutes 10]
                                    [--example mixed] [--quick]

A pure simulation on a minute clock, no cluster. The request rate follows a diurnal sinusoid
(trough at 02:00 at half the example's rate, peak at 14:00 at twice it) with seeded AR(1)
multiplicative noise. From 09:00 to 11:00, on the morning ramp, the GPU type carrying the largest
share of the peak plan's cost has a capacity outage: none of its replicas becomes ready (those
already ready keep running); a replica due in the outage becomes ready `--startup-minutes` after
it ends. Otherwise a replica asked for becomes ready `--startup-minutes` later, and a removed one
goes at once (not-ready replicas first).

Every strategy runs the operator's own decision functions, once a minute, as its reconcile loop
calls them (`melange.controller.loop` and `.pools`):

- **today**: `rates.decide` (tolerance 10%, scale-down window 300 s) + solve + every pool set to
  the plan at once (no `spec.transition`, no `minSavings`);
- **operator**: the same with `spec.transition` (make-before-break, readyTimeoutSeconds,
  capacityTimeoutSeconds: `transition.next_step`, `transition.update_capacity`) and
  `minSavings: 0.05` (`choose.choose_plan`);
- **static peak**: the plan for the trace's highest rate, ready from the start, never changed;
- **single <type>**: as **operator**, on a spec with only the type whose plan for the peak is the
  cheapest;
- **oracle**: knows the trace: each minute the cheapest plan for that minute's rate, ready at once
  (within the outage: never more of the outage type than it has).

Every strategy starts at the plan for the first minute's rate, ready. Per strategy: GPU-hours and
cost (every replica asked for is paid for each minute, ready or not), patches (pool count
changes), mix changes (the set of types with replicas asked for changes; "plan mix": the same for
the plan in force, which make-before-break's overlaps do not change), and minutes whose ready
fleet cannot serve the minute's rate, during the outage and outside it. "Short" is against the
spec's own sizing: the fleet's highest servable rate for the spec's distribution with every type
loaded to at most 1/(1 + headroom) (an LP in HiGHS); "over" is against the full capacity (the
headroom spent as well), the minutes when requests queue. A rate within the drift tolerance above
the solved one is short by design (the headroom covers it), so "over" is the service measure.
Goal: the operator's cost within 5% of the oracle's.

Solves are cached by rate (rounded up to a 0.25% grid).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from melange import api
from melange.controller import choose, decide, transition
from melange.plan import highs, solver
from melange.plan.result import Plan
from melange.signals import rates

EXAMPLES = Path(__file__).parents[1] / "examples"
START = datetime(2026, 1, 1, tzinfo=UTC)
DAY_MINUTES = 24 * 60
TROUGH_FACTOR, PEAK_FACTOR = 0.5, 2.0  # of the example's totalRate
TROUGH_HOUR, OUTAGE_HOURS = 2.0, (9.0, 11.0)
NOISE_RHO, NOISE_SIGMA = 0.9, 0.02  # AR(1) on the log rate: about 4.6% standard deviation
TOLERANCE, WINDOW_SECONDS, INTERVAL_SECONDS = 0.1, 300, 60
MIN_SAVINGS = 0.05
CAPACITY_RETRY_SECONDS = 1800
# Solves are cached by rate: every rate is rounded up to this relative grid before it is solved,
# so the plans are for at most 0.25% more than the rate (never less: a plan still serves it).
RATE_GRID = 0.0025
GOAL = 0.05  # the operator's cost within 5% of the oracle's
MAX_RESOLVES_PER_MINUTE = 3  # a capacity cap set or lifted re-solves at once, as the loop does


def grid(rate: float) -> float:
    """`rate` rounded up to the cache's relative grid."""
    if rate <= 0:
        return 0.0
    step = math.log1p(RATE_GRID)
    return round(math.exp(math.ceil(math.log(rate) / step - 1e-9) * step), 9)


# -- solves ---------------------------------------------------------------------------------------

Caps = tuple[tuple[str, int], ...]


def _capped(spec: api.AllocationSpec, caps: Caps) -> api.AllocationSpec:
    limits = dict(caps)
    gpus = [
        g.model_copy(update={"max_replicas": limits[g.name]}) if g.name in limits else g
        for g in spec.gpus
    ]
    return spec.model_copy(update={"gpus": gpus})


class Solves:
    """Every solve of the run, cached by its inputs."""

    def __init__(self) -> None:
        self.cache: dict[tuple[object, ...], Plan] = {}

    def plan(
        self,
        key: str,
        spec: api.AllocationSpec,
        rate: float,
        caps: Caps | Mapping[str, transition.Cap],
        current: Mapping[str, int] | None = None,
    ) -> Plan:
        """The plan for `rate` (a grid rate). `caps` as counts: a plain solve with those types
        capped; as `Cap`s: `choose.choose_plan` with the counts in force."""
        if isinstance(caps, tuple):
            shape: object = caps
        else:
            shape = tuple(sorted((n, c.replicas) for n, c in caps.items()))
        held = tuple(sorted(current.items())) if current else None
        cache_key = (key, rate, isinstance(caps, tuple), shape, held)
        if cache_key not in self.cache:
            if isinstance(caps, tuple):
                plan = solver.solve_spec(_capped(spec, caps), rate)
            else:
                plan = choose.choose_plan(spec, rate, caps, current).plan
            self.cache[cache_key] = plan
        return self.cache[cache_key]


# -- the trace ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trace:
    rates: tuple[float, ...]  # req/s, one per minute
    outage_gpu: str
    outage: tuple[int, int]  # [start, end) in minutes

    def in_outage(self, minute: int) -> bool:
        return self.outage[0] <= minute < self.outage[1]


def diurnal(base_rate: float, minutes: int, day_minutes: int, seed: int) -> list[float]:
    """A sinusoid from the night trough to the day peak, times seeded AR(1) noise."""
    trough, peak = TROUGH_FACTOR * base_rate, PEAK_FACTOR * base_rate
    noise = random.Random(seed)
    level = 0.0
    out = []
    for t in range(minutes):
        phase = 2 * math.pi * (t / day_minutes - TROUGH_HOUR / 24)
        level = NOISE_RHO * level + noise.gauss(0.0, NOISE_SIGMA)
        out.append((trough + (peak - trough) * (1 - math.cos(phase)) / 2) * math.exp(level))
    return out


# -- serving capacity -----------------------------------------------------------------------------


class Capacity:
    """The highest rate a ready fleet serves with the spec's distribution, cached by fleet."""

    def __init__(self, spec: api.AllocationSpec) -> None:
        self.names = [g.name for g in spec.gpus]
        self.headroom = spec.headroom
        matrix = spec.workload.distribution
        total = sum(sum(row) for row in matrix)
        self.buckets = [
            (i, j, value / total)
            for i, row in enumerate(matrix)
            for j, value in enumerate(row)
            if value > 0
        ]
        self.pairs = [
            (g, b, gpu.throughput[i][j])
            for g, gpu in enumerate(spec.gpus)
            for b, (i, j, _) in enumerate(self.buckets)
            if gpu.throughput[i][j] > 0
        ]
        self._cache: dict[tuple[int, ...], float] = {}

    def max_rate(self, ready: Mapping[str, int]) -> float:
        """max R: each bucket's R * share split across types, sum(load / throughput) <= ready/(1+h)."""
        fleet = tuple(ready.get(name, 0) for name in self.names)
        if fleet not in self._cache:
            self._cache[fleet] = self._solve(fleet)
        return self._cache[fleet]

    def _solve(self, fleet: tuple[int, ...]) -> float:
        pairs = [(g, b, t) for g, b, t in self.pairs if fleet[g] > 0]
        served = {b for _, b, _ in pairs}
        if len(served) < len(self.buckets):
            return 0.0
        buckets, types = len(self.buckets), len(fleet)
        rows, cols, values = [], [], []
        for b, (_, _, share) in enumerate(self.buckets):  # sum_g y[g,b] - share * R = 0
            rows.append(b)
            cols.append(0)
            values.append(-share)
        for k, (g, b, throughput) in enumerate(pairs, start=1):
            rows += [b, buckets + g]
            cols += [k, k]
            values += [1.0, 1.0 / throughput]
        columns = len(pairs) + 1
        cost = np.zeros(columns)
        cost[0] = -1.0
        limit = [count / (1.0 + self.headroom) for count in fleet]
        model = highs.Milp(
            cost=cost,
            col_lower=np.zeros(columns),
            col_upper=np.full(columns, np.inf),
            integer=np.zeros(columns, dtype=np.bool_),
            rows=np.array(rows, dtype=np.int32),
            cols=np.array(cols, dtype=np.int32),
            values=np.array(values, dtype=np.float64),
            row_lower=np.array([0.0] * buckets + [-np.inf] * types),
            row_upper=np.array([0.0] * buckets + limit),
        )
        result = highs.solve(model)
        assert result.x is not None, result.outcome
        return float(result.x[0])


# -- the node pools -------------------------------------------------------------------------------


@dataclass
class Pool:
    """One GPU type's pool: ready replicas, and the minutes at which the asked-for ones get ready."""

    ready: int = 0
    pending: list[int] = field(default_factory=list)

    @property
    def count(self) -> int:
        return self.ready + len(self.pending)

    def set_count(self, count: int, minute: int, startup: int) -> None:
        """Scale: new replicas are ready `startup` minutes from now; removed ones go at once,
        the not-ready ones first (as a Deployment or a MachineDeployment removes them)."""
        if count > self.count:
            self.pending += [minute + startup] * (count - self.count)
        while self.count > count:
            if self.pending:
                self.pending.remove(max(self.pending))
            else:
                self.ready -= 1

    def advance(self, minute: int, blocked: tuple[int, int] | None, startup: int) -> None:
        """Replicas due by `minute` become ready; within an outage they wait for its end."""
        due = [at for at in self.pending if at <= minute]
        if not due:
            return
        self.pending = [at for at in self.pending if at > minute]
        if blocked is not None and blocked[0] <= minute < blocked[1]:
            self.pending += [blocked[1] + startup] * len(due)
        else:
            self.ready += len(due)


# -- the strategies -------------------------------------------------------------------------------


@dataclass
class Tally:
    """What one strategy did over the trace."""

    name: str
    gpu_minutes: float = 0.0
    cost: float = 0.0  # currency, all replicas asked for, ready or not
    patches: int = 0
    mix_changes: int = 0  # of the pools (asked-for counts)
    plan_mix_changes: int = 0  # of the plans acted on: make-before-break's overlaps left out
    short_outage: int = 0
    short_outside: int = 0
    over_outage: int = 0
    over_outside: int = 0
    mix: frozenset[str] = frozenset()
    plan_mix: frozenset[str] = frozenset()

    def record_counts(self, previous: Mapping[str, int], counts: Mapping[str, int]) -> None:
        self.patches += sum(1 for n, c in counts.items() if previous.get(n, 0) != c)
        mix = frozenset(n for n, c in counts.items() if c > 0)
        if mix != self.mix:
            self.mix_changes += 1
            self.mix = mix

    def record_plan(self, counts: Mapping[str, int]) -> None:
        mix = frozenset(n for n, c in counts.items() if c > 0)
        if mix != self.plan_mix:
            self.plan_mix_changes += 1
            self.plan_mix = mix

    @property
    def gpu_hours(self) -> float:
        return self.gpu_minutes / 60


class Strategy(ABC):
    """Pools plus a policy that sets their counts once a minute."""

    def __init__(self, name: str, spec: api.AllocationSpec, startup: int) -> None:
        self.name, self.spec, self.startup = name, spec, startup
        self.pools = {g.name: Pool() for g in spec.gpus}
        self.prices = {g.name: g.cost_per_hour for g in spec.gpus}
        self.tally = Tally(name)

    def start(self, counts: Mapping[str, int]) -> None:
        """Begin at `counts`, every replica ready (a steady state before the trace)."""
        for name, count in counts.items():
            self.pools[name].ready = count
        self.tally.mix = self.tally.plan_mix = frozenset(n for n, c in counts.items() if c > 0)

    def counts(self) -> dict[str, int]:
        return {name: pool.count for name, pool in self.pools.items()}

    def ready(self) -> dict[str, int]:
        return {name: pool.ready for name, pool in self.pools.items()}

    def apply(self, targets: Mapping[str, int], minute: int) -> None:
        before = self.counts()
        for name, count in targets.items():
            self.pools[name].set_count(count, minute, self.startup)
        self.tally.record_counts(before, self.counts())

    @abstractmethod
    def act(self, minute: int, observed: float) -> None:
        """What the strategy does at this minute, having seen this rate."""


class Static(Strategy):
    """The peak's plan, never changed."""

    def act(self, minute: int, observed: float) -> None:
        return None


class Oracle(Strategy):
    """The cheapest plan for this minute's actual rate, ready at once; within the outage never
    more of the outage type than it has (no new capacity)."""

    def __init__(
        self, spec: api.AllocationSpec, trace: Trace, solves: Solves, startup: int
    ) -> None:
        super().__init__("oracle", spec, startup)
        self.trace, self.solves = trace, solves

    def act(self, minute: int, observed: float) -> None:
        caps: Caps = ()
        if self.trace.in_outage(minute):
            caps = ((self.trace.outage_gpu, self.pools[self.trace.outage_gpu].count),)
        plan = self.solves.plan("full", self.spec, grid(observed), caps)
        if not plan.solved:
            return
        targets = decide.desired_replicas(self.spec, plan)
        before = self.counts()
        for name, count in targets.items():
            self.pools[name] = Pool(ready=count)
        self.tally.record_counts(before, targets)
        self.tally.record_plan(targets)


class Operator(Strategy):
    """The reconcile loop's decisions (`melange.controller.loop` and `.pools`), once a minute:
    observe → `rates.decide` → `choose.choose_plan` (only when the rate or the caps changed) →
    `transition.next_step` → patch → `transition.update_capacity`; a cap set or lifted re-solves
    at once. Without `spec.transition` the pools go to the plan at once and no ready count is read.
    """

    def __init__(
        self, name: str, spec: api.AllocationSpec, rate: float, solves: Solves, startup: int
    ) -> None:
        super().__init__(name, spec, startup)
        self.solves = solves
        self.rate = grid(rate)
        self.history: tuple[rates.RateSample, ...] = (rates.RateSample(START, rate),)
        self.capacity = transition.Capacity()
        self.transition_since: datetime | None = None
        self.last_scale: dict[str, datetime] = {}
        self.solved: tuple[object, Plan] | None = None
        self.planned: dict[str, int] | None = None  # status.gpus: the plan in force
        first = self._plan()
        assert first.solved, first.reason
        self.start(decide.desired_replicas(spec, first))

    def _plan(self) -> Plan:
        caps = self.capacity.caps if self.spec.transition is not None else {}
        current = self.planned if self.spec.min_savings is not None else None
        inputs = (self.rate, tuple(sorted((n, c.replicas) for n, c in caps.items())))
        if self.solved is not None and self.solved[0] == inputs:
            return self.solved[1]
        plan = self.solves.plan(self.name, self.spec, self.rate, caps, current)
        self.solved = (inputs, plan)
        if plan.solved:
            self.planned = plan.replicas()
        return plan

    def act(self, minute: int, observed: float) -> None:
        now = START + timedelta(minutes=minute)
        decision = rates.decide(
            self.history,
            observed,
            self.rate,
            tolerance=TOLERANCE,
            window_seconds=WINDOW_SECONDS,
            now=now,
            observed_since=START,
        )
        self.history = decision.history
        if decision.rate is not None:
            self.rate = grid(decision.rate)
        for _ in range(MAX_RESOLVES_PER_MINUTE):
            plan = self._plan()
            if not plan.solved:
                break  # node pools left as they are
            if not self._scale(decide.desired_replicas(self.spec, plan), minute, now):
                break
        if self.planned is not None:
            self.tally.record_plan(self.planned)

    def _scale(self, desired: Mapping[str, int], minute: int, now: datetime) -> bool:
        """`Pools.scale`; True when a capacity cap was set or lifted (re-solve at once)."""
        mbb = self.spec.transition
        readings = {
            name: transition.PoolReading(pool.count, pool.ready if mbb is not None else None)
            for name, pool in self.pools.items()
        }
        step = transition.spec_step(
            self.spec,
            desired,
            readings,
            self.last_scale,
            self.transition_since,
            now,
            INTERVAL_SECONDS,
        )
        for name, count in step.targets.items():
            if count != self.pools[name].count:
                self.last_scale[name] = now
        self.apply(step.targets, minute)
        if mbb is None:
            return False
        after = {
            name: transition.PoolReading(self.pools[name].count, readings[name].ready)
            for name in self.pools
        }
        moving = step.in_progress or any(r.ready_count < r.current for r in after.values())
        self.transition_since = (self.transition_since or now) if moving else None
        change = transition.update_capacity(
            self.capacity, after, now, mbb.capacity_timeout_seconds, mbb.capacity_retry_seconds
        )
        self.capacity = change.capacity
        return bool(change.new_caps or change.lifted)


# -- the run --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    example: str
    trace: Trace
    startup: int
    single_gpu: str
    tallies: tuple[Tally, ...]
    solves: int
    seconds: float

    def tally(self, name: str) -> Tally:
        return next(t for t in self.tallies if t.name == name)


def load_spec(example: str) -> api.AllocationSpec:
    path = EXAMPLES / (example if example.endswith(".yaml") else f"{example}.yaml")
    return api.load_bytes(path.read_bytes(), source=str(path)).spec


def operator_spec(spec: api.AllocationSpec, startup: int) -> api.AllocationSpec:
    """The example with make-before-break, capacity caps and minSavings set."""
    mbb = api.Transition.model_validate(
        {
            "readyTimeoutSeconds": 2 * startup * 60,
            "capacityTimeoutSeconds": 2 * startup * 60,
            "capacityRetrySeconds": CAPACITY_RETRY_SECONDS,
        }
    )
    return spec.model_copy(update={"transition": mbb, "min_savings": MIN_SAVINGS})


def run(
    example: str = "mixed",
    seed: int = 0,
    hours: float = 24.0,
    startup: int = 10,
    quick: bool = False,
) -> Result:
    """Replay the trace through every strategy; `quick` compresses the day (outage included) into
    `hours`."""
    began = time.perf_counter()
    spec = load_spec(example)
    minutes = round(hours * 60)
    day = minutes if quick else DAY_MINUTES
    rates_ = diurnal(spec.workload.total_rate, minutes, day, seed)

    solves = Solves()
    peak = solves.plan("full", spec, grid(max(rates_)), ())
    assert peak.solved, peak.reason
    by_cost = {g.name: g.cost_per_hour for g in peak.gpus}
    outage_gpu = max(by_cost, key=lambda n: by_cost[n])
    singles = [b for b in peak.baselines if b.cost_per_hour is not None]
    single_gpu = min(singles, key=lambda b: b.cost_per_hour or math.inf).gpu
    start, end = (round(day * h / 24) for h in OUTAGE_HOURS)
    trace = Trace(tuple(rates_), outage_gpu, (start, end))

    tuned = operator_spec(spec, startup)
    single_spec = tuned.model_copy(update={"gpus": [g for g in spec.gpus if g.name == single_gpu]})
    static = Static("static peak", spec, startup)
    static.start(decide.desired_replicas(spec, peak))
    oracle = Oracle(spec, trace, solves, startup)
    first = solves.plan("full", spec, grid(rates_[0]), ())
    oracle.start(decide.desired_replicas(spec, first))
    strategies: list[Strategy] = [
        Operator("today", spec, rates_[0], solves, startup),
        Operator("operator", tuned, rates_[0], solves, startup),
        static,
        Operator(f"single {single_gpu}", single_spec, rates_[0], solves, startup),
        oracle,
    ]
    capacity = Capacity(spec)
    for minute, demand in enumerate(rates_):
        outage = trace.in_outage(minute)
        for strategy in strategies:
            for name, pool in strategy.pools.items():
                pool.advance(minute, trace.outage if name == outage_gpu else None, startup)
            strategy.act(minute, demand)
            tally = strategy.tally
            counts = strategy.counts()
            tally.gpu_minutes += sum(counts.values())
            tally.cost += sum(c * strategy.prices[n] for n, c in counts.items()) / 60
            servable = capacity.max_rate(strategy.ready())
            if servable < demand * (1 - 1e-9):
                if outage:
                    tally.short_outage += 1
                else:
                    tally.short_outside += 1
            if servable * (1 + spec.headroom) < demand * (1 - 1e-9):
                if outage:
                    tally.over_outage += 1
                else:
                    tally.over_outside += 1
    return Result(
        example,
        trace,
        startup,
        single_gpu,
        tuple(s.tally for s in strategies),
        len(solves.cache),
        time.perf_counter() - began,
    )


# -- the report -----------------------------------------------------------------------------------


def table(result: Result) -> str:
    oracle = result.tally("oracle")
    header = (
        f"{'strategy':<12} {'GPU-h':>6} {'cost':>8} {'x oracle':>8} {'patches':>7} "
        f"{'mix chg':>7} {'plan mix':>8} {'short in/out outage':>19} {'over in/out outage':>18}"
    )
    lines = [header, "-" * len(header)]
    for t in result.tallies:
        ratio = t.cost / oracle.cost if oracle.cost else math.nan
        short = f"{t.short_outage}/{t.short_outside}"
        over = f"{t.over_outage}/{t.over_outside}"
        lines.append(
            f"{t.name:<12} {t.gpu_hours:>6.1f} {t.cost:>8.2f} {ratio:>8.3f} {t.patches:>7} "
            f"{t.mix_changes:>7} {t.plan_mix_changes:>8} {short:>19} {over:>18}"
        )
    minutes = len(result.trace.rates)
    outage = result.trace.outage[1] - result.trace.outage[0]
    lines.append(
        f"(minutes: {outage} in the outage, {minutes - outage} outside; short: the ready fleet "
        "serves less than the rate at the spec's headroom; over: less even with the headroom spent)"
    )
    return "\n".join(lines)


def checks(result: Result) -> list[tuple[bool, str]]:
    """The goal and the properties the design promises, each with its numbers."""
    oracle, operator, today = (result.tally(n) for n in ("oracle", "operator", "today"))
    ratio = operator.cost / oracle.cost
    return [
        (
            ratio <= 1 + GOAL,
            f"goal: operator cost within {GOAL:.0%} of the oracle's: {operator.cost:.2f} vs "
            f"{oracle.cost:.2f} (x{ratio:.3f}, {ratio - 1:+.1%})",
        ),
        (
            all(oracle.cost <= t.cost + 1e-9 for t in result.tallies),
            "the oracle is the cheapest strategy",
        ),
        (
            operator.mix_changes <= today.mix_changes,
            f"operator mix changes <= today's: {operator.mix_changes} vs {today.mix_changes}",
        ),
        (
            operator.short_outage <= today.short_outage,
            f"operator minutes short in the outage <= today's: {operator.short_outage} vs "
            f"{today.short_outage}",
        ),
        (
            operator.short_outside <= today.short_outside,
            f"operator minutes short outside the outage <= today's: {operator.short_outside} vs "
            f"{today.short_outside}",
        ),
    ]


def describe(result: Result) -> str:
    trace = result.trace
    minutes = len(trace.rates)
    start, end = trace.outage
    return (
        f"{result.example}: {minutes} min, rate {min(trace.rates):.1f}..{max(trace.rates):.1f} req/s "
        f"(mean {sum(trace.rates) / minutes:.1f}); start-up {result.startup} min; outage of "
        f"{trace.outage_gpu} (no new replica ready) in minutes [{start}, {end}); single type: "
        f"{result.single_gpu}\noperator: tolerance {TOLERANCE:.0%}, scale-down window "
        f"{WINDOW_SECONDS} s, readyTimeout = capacityTimeout = {2 * result.startup * 60} s, "
        f"capacityRetry {CAPACITY_RETRY_SECONDS} s, minSavings {MIN_SAVINGS:.0%}\n"
        f"solves cached by rate rounded up to a {RATE_GRID:.2%} grid: {result.solves} distinct "
        f"solves, {result.seconds:.1f} s in all"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hours", type=float, default=24.0, help="trace length")
    parser.add_argument("--startup-minutes", type=int, default=10, help="node start-up delay")
    parser.add_argument(
        "--example",
        default="mixed",
        choices=sorted(p.stem for p in EXAMPLES.glob("*.yaml")),
        help="which examples/*.yaml",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a 3-hour trace with the whole day compressed into it"
    )
    args = parser.parse_args(argv)
    hours = 3.0 if args.quick else args.hours
    result = run(args.example, args.seed, hours, args.startup_minutes, quick=args.quick)
    print(describe(result))
    print()
    print(table(result))
    print()
    for ok, text in checks(result):
        print(f"{'met    ' if ok else 'NOT MET'}  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
