"""A solver instance: per-bucket request rates, the GPU types to choose from, and the rules of a plan.

The rules are stated here once, for the solver, its certificate check and the tests alike: a type
carrying `load` instances' worth of traffic (headroom included) needs `replicas_for(load)` of them, and a
plan's cost is a multiple of `cost_unit` when the prices lie on such a grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from melange.api import MAX_REPLICAS, AllocationSpec, bucket_label

# Loads within this of an integer count as that integer: floating-point noise must not buy a GPU.
LOAD_EPSILON = 1e-7


def replicas_for(load: float, min_replicas: int = 0) -> int:
    """Instances that carry `load` (headroom included), never fewer than `min_replicas`."""
    return max(min_replicas, math.ceil(load - LOAD_EPSILON))


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

    @classmethod
    def from_spec(
        cls, spec: AllocationSpec, rate: float | None = None, slice_factor: int | None = None
    ) -> Problem:
        """Turn a validated spec into rates: bucket (i, j) gets `R * D[i][j] / sum(D)`."""
        total_rate = spec.workload.total_rate if rate is None else rate
        # shares of the largest cell first: cells near the float maximum would overflow their sum,
        # and a rate near it times a cell over a small sum would overflow too
        largest = max((v for row in spec.workload.distribution for v in row), default=0.0)
        shares = [
            [v / largest if largest > 0 else 0.0 for v in row] for row in spec.workload.distribution
        ]
        weight = sum(sum(row) for row in shares)
        rates = tuple(
            tuple(total_rate * (v / weight) if weight > 0 else 0.0 for v in row) for row in shares
        )
        slices = spec.slice_factor if slice_factor is None else slice_factor

        def usable(i: int, j: int, throughput: float) -> float:
            """A bucket one slice of which needs more than MAX_REPLICAS instances of a type (the
            most maxReplicas admits) is one that type cannot serve: so no load is ever infinite."""
            load = rates[i][j] / slices / throughput * (1.0 + spec.headroom) if throughput else 0
            return throughput if load <= MAX_REPLICAS else 0.0

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
