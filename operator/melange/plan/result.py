"""A plan as the solver returns it: replicas per type, where each bucket's slices go, and how sure it is.

`Optimal` means proven: the plan passed the certificate check and its cost is within one cost unit of a
lower bound that a different method computed. `Feasible` is a checked plan whose optimality is not
proven (the gap says how far it could be off). `Infeasible` is said only with a proof; `Unsolved` is a
search that ended (by its time limit) with neither a plan nor a proof.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Status = Literal["Optimal", "Feasible", "Infeasible", "Unsolved"]
Method = Literal["decomposition", "direct"]
METHODS: tuple[Method, ...] = ("decomposition", "direct")
DEFAULT_METHOD: Method = "decomposition"


@dataclass(frozen=True)
class GpuResult:
    name: str
    replicas: int
    cost_per_hour: float
    utilization: float  # served load / replicas: the share of the instances' capacity in use
    load: float  # instances' worth of traffic assigned, before headroom


@dataclass(frozen=True)
class Share:
    """`slices` of a bucket's `sliceFactor` equal slices go to `gpu`."""

    gpu: str
    slices: int
    fraction: float


@dataclass(frozen=True)
class BucketAssignment:
    """Where one bucket's traffic goes: the router sends `fraction` of it to `gpu`."""

    input_tokens: tuple[int, int]
    output_tokens: tuple[int, int]
    rate: float
    shares: tuple[Share, ...]


@dataclass(frozen=True)
class Baseline:
    """The cheapest plan that uses one GPU type alone (what Mélange is compared against)."""

    gpu: str
    replicas: int | None
    cost_per_hour: float | None
    reason: str | None = None


@dataclass(frozen=True)
class Plan:
    status: Status
    reason: str | None = None
    gpus: tuple[GpuResult, ...] = ()
    cost_per_hour: float | None = None
    lower_bound: float | None = None
    assignment: tuple[BucketAssignment, ...] = ()
    baselines: tuple[Baseline, ...] = ()
    total_rate: float = 0.0
    solve_seconds: float = 0.0
    method: str = "decomposition"

    @property
    def solved(self) -> bool:
        """A checked plan to act on (proven optimal or not)."""
        return self.status in ("Optimal", "Feasible")

    @property
    def gap(self) -> float | None:
        """Relative distance to the lower bound: how much a better plan could possibly save."""
        if self.cost_per_hour is None or self.lower_bound is None:
            return None
        if self.cost_per_hour <= 0:
            return 0.0
        return max(0.0, (self.cost_per_hour - self.lower_bound) / self.cost_per_hour)

    @property
    def best_baseline(self) -> Baseline | None:
        feasible = [b for b in self.baselines if b.cost_per_hour is not None]
        return min(feasible, key=lambda b: (b.cost_per_hour, b.gpu)) if feasible else None

    @property
    def saving(self) -> float | None:
        """Fraction saved against the cheapest single-type plan."""
        best = self.best_baseline
        if best is None or best.cost_per_hour is None or self.cost_per_hour is None:
            return None
        if best.cost_per_hour <= 0:
            return 0.0
        return (best.cost_per_hour - self.cost_per_hour) / best.cost_per_hour

    def replicas(self) -> dict[str, int]:
        return {g.name: g.replicas for g in self.gpus}
