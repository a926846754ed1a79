"""A solver instance: per-bucket request rates, the GPU types to choose from, and the rules of a plan.

The rules are stated here once, for the solver, its certificate check and the tests alike: a type
carrying `load` instances' worth of traffic (headroom included) needs `replicas_for(load)` of them, and a
plan's cost is a multiple of `cost_unit` when the prices lie on such a grid.

Every number is bounded (the spec's bounds, `melange.api`), and a problem checks its own on
construction, so nothing the solver sums or multiplies can overflow: a slice's load is at most
MAX_REPLICAS instances (a type that would need more cannot serve the bucket), a type's load at
most 32 x 32 buckets x 1,024 slices of that, and a plan's cost at most 16 x that x 1e9.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from melange.api import (
    MAX_COST_PER_HOUR,
    MAX_RATE,
    MAX_REPLICAS,
    MAX_SLICE_FACTOR,
    AllocationSpec,
    bucket_label,
)

# Loads within this of an integer count as that integer: floating-point noise must not buy a GPU.
LOAD_EPSILON = 1e-7


def replicas_for(load: float, min_replicas: int = 0) -> int:
    """Instances that carry `load` (headroom included), never fewer than `min_replicas`."""
    if not math.isfinite(load):
        raise ValueError(f"a load of {load} instances is not a finite number")
    return max(min_replicas, math.ceil(load - LOAD_EPSILON))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _in(value: float, low: float, high: float) -> bool:
    return math.isfinite(value) and low <= value <= high


def cost_unit(costs: Sequence[float]) -> float | None:
    """The coarsest grid all costs lie on (0.01 for cents), if any down to 1e-6.

    Every plan's cost is then a multiple of it, so a plan within less than one unit of a lower bound
    is proven optimal: an exact stopping rule, where a relative gap would accept near-optima.
    """
    for decimals in range(7):
        unit = 10.0**-decimals
        ratios = [c / unit for c in costs]
        if all(math.isfinite(r) and abs(r - round(r)) < 1e-6 for r in ratios):
            return unit
    return None


@dataclass(frozen=True)
class GpuOption:
    """One GPU type as the solver sees it."""

    name: str
    cost_per_hour: float
    throughput: tuple[tuple[float, ...], ...]
    min_replicas: int = 0
    max_replicas: int | None = None


@dataclass(frozen=True)
class Problem:
    """Per-bucket request rates (req/s) and the GPU types to choose from."""

    input_edges: tuple[int, ...]
    output_edges: tuple[int, ...]
    rates: tuple[tuple[float, ...], ...]
    gpus: tuple[GpuOption, ...]
    slice_factor: int = 8
    headroom: float = 0.0

    def __post_init__(self) -> None:
        """Refuse numbers outside the bounds that keep every sum and product finite (a spec that
        passed `melange.api` never has them; an observed rate or a fitted matrix might)."""
        _check(
            1 <= self.slice_factor <= MAX_SLICE_FACTOR,
            f"slice factor {self.slice_factor} is not within 1..{MAX_SLICE_FACTOR}",
        )
        _check(_in(self.headroom, 0.0, 10.0), f"headroom {self.headroom} is not within 0..10")
        _check(
            all(_in(r, 0.0, MAX_RATE) for row in self.rates for r in row),
            f"a bucket's rate is not a number within 0..{MAX_RATE:g} req/s",
        )
        for gpu in self.gpus:
            _check(
                _in(gpu.cost_per_hour, 0.0, MAX_COST_PER_HOUR) and gpu.cost_per_hour > 0,
                f"{gpu.name}: cost {gpu.cost_per_hour} is not within (0, {MAX_COST_PER_HOUR:g}]",
            )
            _check(
                all(_in(t, 0.0, MAX_RATE) for row in gpu.throughput for t in row),
                f"{gpu.name}: a throughput is not a number within 0..{MAX_RATE:g} req/s",
            )

    @classmethod
    def from_spec(
        cls, spec: AllocationSpec, rate: float | None = None, slice_factor: int | None = None
    ) -> Problem:
        """Turn a validated spec into rates: bucket (i, j) gets `R * D[i][j] / sum(D)`.

        `rate` (an observed rate) replaces `workload.totalRate`; outside 0..MAX_RATE it is refused
        (ValueError), as a spec's would be. A positive rate over a matrix with a positive cell gives
        a positive total: the largest cell's bucket gets at least `rate / 1024`.
        """
        total_rate = spec.workload.total_rate if rate is None else rate
        _check(
            _in(total_rate, 0.0, MAX_RATE),
            f"the request rate {total_rate} req/s is not a number within 0..{MAX_RATE:g}",
        )
        matrix = spec.workload.distribution
        _check(
            all(math.isfinite(v) and v >= 0 for row in matrix for v in row),
            "the distribution has a cell that is negative or not a finite number",
        )
        # Shares of the largest cell: each in [0, 1], the largest exactly 1, so their sum is in
        # [1, 1024] and never overflows, whatever the cells' scale (a fitted matrix is unbounded).
        largest = max((v for row in matrix for v in row), default=0.0)
        shares = [[v / largest if largest > 0 else 0.0 for v in row] for row in matrix]
        weight = sum(sum(row) for row in shares)
        rates = tuple(
            tuple(total_rate * (v / weight) if weight > 0 else 0.0 for v in row) for row in shares
        )
        # Only a rate far below any the spec admits (MIN_POSITIVE_RATE) can vanish in the division.
        _check(
            not (total_rate > 0 and largest > 0) or any(r > 0 for row in rates for r in row),
            f"the request rate {total_rate} req/s is too small to share between buckets",
        )
        slices = spec.slice_factor if slice_factor is None else slice_factor

        def usable(i: int, j: int, throughput: float) -> float:
            """A bucket one slice of which needs more than MAX_REPLICAS instances of a type (the
            most maxReplicas admits) is one that type cannot serve: so no load is ever infinite.
            Compared as a product: the quotient by a throughput of 5e-324 would overflow."""
            rate = rates[i][j]
            if rate <= 0 or throughput <= 0:
                return throughput
            fits = rate * (1.0 + spec.headroom) <= MAX_REPLICAS * slices * throughput
            return throughput if fits else 0.0

        return cls(
            input_edges=tuple(spec.buckets.input_tokens),
            output_edges=tuple(spec.buckets.output_tokens),
            rates=rates,
            gpus=tuple(
                GpuOption(
                    name=g.name,
                    cost_per_hour=g.cost_per_hour,
                    throughput=tuple(
                        tuple(usable(i, j, t) for j, t in enumerate(row))
                        for i, row in enumerate(g.throughput)
                    ),
                    min_replicas=g.min_replicas,
                    max_replicas=g.max_replicas,
                )
                for g in spec.gpus
            ),
            slice_factor=slices,
            headroom=spec.headroom,
        )

    @property
    def total_rate(self) -> float:
        return sum(sum(row) for row in self.rates)

    def demand_buckets(self) -> list[tuple[int, int]]:
        """Buckets with traffic, in row-major order."""
        return [
            (i, j) for i, row in enumerate(self.rates) for j, rate in enumerate(row) if rate > 0
        ]

    def bucket_label(self, i: int, j: int) -> str:
        return bucket_label(self.input_edges, self.output_edges, i, j)

    def slice_load(self, g: int, i: int, j: int) -> float:
        """Instances of type g that one slice of bucket (i, j) occupies, headroom included."""
        return (
            self.rates[i][j]
            / self.slice_factor
            / self.gpus[g].throughput[i][j]
            * (1.0 + self.headroom)
        )

    def unservable(self) -> list[str]:
        """A reason for each bucket with traffic that no GPU type can serve."""
        return [
            f"no GPU type can serve {self.bucket_label(i, j)} ({self.rates[i][j]:.4g} req/s)"
            for i, j in self.demand_buckets()
            if all(gpu.throughput[i][j] <= 0 for gpu in self.gpus)
        ]

    def capped_reason(self) -> str:
        """Why a servable workload has no plan: the caps of the types that could carry it."""
        demand = self.demand_buckets()
        capped = [
            f"{gpu.name} (maxReplicas {gpu.max_replicas})"
            for gpu in self.gpus
            if gpu.max_replicas is not None and any(gpu.throughput[i][j] > 0 for i, j in demand)
        ]
        return (
            f"the demand of {self.total_rate:.4g} req/s does not fit within maxReplicas of "
            + ", ".join(capped)
        )
