"""A problem as arrays, in a canonical order, so that the search does not depend on how it was listed.

GPU types are sorted by what they are (price, limits, throughput), not by name or position, and so are
the buckets with traffic; a permuted problem is then the same search, with the answer mapped back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from melange.plan.highs import Floats, Ints, Milp
from melange.plan.problem import LOAD_EPSILON, Problem


@dataclass(frozen=True)
class Instance:
    problem: Problem
    types: tuple[int, ...]  # canonical type -> its index in the problem
    buckets: tuple[tuple[int, int], ...]  # canonical bucket -> its (row, column) in the problem
    slice_load: Floats  # [type, bucket]: instances one slice occupies (headroom in); 0 if unserved
    served: np.ndarray  # [type, bucket]: the type can serve the bucket
    cost: Floats
    lower: Floats  # minReplicas
    upper: Floats  # maxReplicas, inf when unbounded

    @classmethod
    def of(cls, problem: Problem) -> Instance:
        gpus = problem.gpus
        types = sorted(
            range(len(gpus)),
            key=lambda g: (
                gpus[g].cost_per_hour,
                gpus[g].min_replicas,
                math.inf if gpus[g].max_replicas is None else gpus[g].max_replicas,
                gpus[g].throughput,
            ),
        )
        buckets = sorted(
            problem.demand_buckets(),
            key=lambda b: (
                problem.rates[b[0]][b[1]],
                [gpus[g].throughput[b[0]][b[1]] for g in types],
            ),
        )
        throughput = np.array(
            [[gpus[g].throughput[i][j] for i, j in buckets] for g in types], dtype=np.float64
        ).reshape(len(types), len(buckets))
        rates = np.array([problem.rates[i][j] for i, j in buckets], dtype=np.float64)
        served = throughput > 0
        with np.errstate(divide="ignore"):
            load = np.where(
                served,
                rates
                / problem.slice_factor
                / np.where(served, throughput, 1.0)
                * (1.0 + problem.headroom),
                0.0,
            )
        return cls(
            problem=problem,
            types=tuple(types),
            buckets=tuple(buckets),
            slice_load=load,
            served=served,
            cost=np.array([gpus[g].cost_per_hour for g in types], dtype=np.float64),
            lower=np.array([gpus[g].min_replicas for g in types], dtype=np.float64),
            upper=np.array(
                [np.inf if gpus[g].max_replicas is None else gpus[g].max_replicas for g in types],
                dtype=np.float64,
            ),
        )

    @property
    def slices(self) -> int:
        return self.problem.slice_factor

    def lower_bound(self) -> float:
        """A bound in closed form: each bucket at its cheapest cost per load, or the minimum fleet."""
        per_load = np.where(self.served, self.cost[:, None] * self.slice_load, np.inf)
        spread = float(per_load.min(axis=0).sum()) * self.slices if self.buckets else 0.0
        return max(spread, float(self.cost @ self.lower))

    def counted(
        self,
        *,
        integral: bool,
        lower: Floats | None = None,
        upper: Floats | None = None,
        buckets: Ints | None = None,
        fixed_load: Floats | None = None,
        excluded: tuple[Floats, ...] = (),
        objective: bool = True,
    ) -> tuple[Milp, Ints, Ints]:
        """The counted-form model: n[type] replicas, k[type, bucket] slices of each bucket per type.

        `buckets` restricts it to some buckets, the others' load being `fixed_load`; each fleet in
        `excluded` is cut off with every fleet it dominates (one that has no integer assignment has
        none of the smaller ones either). Returns the model and the (type, bucket) of each k column.
        """
        types = len(self.cost)
        chosen = np.arange(len(self.buckets)) if buckets is None else buckets
        pair_type, pair_slot = np.nonzero(self.served[:, chosen])
        pair_bucket = chosen[pair_slot]
        pairs = len(pair_type)
        n_lower = self.lower if lower is None else lower
        n_upper = self.upper if upper is None else upper
        capacity = np.full(types, LOAD_EPSILON * 0.99)
        if fixed_load is not None:
            capacity = capacity - fixed_load
        k_cols = types + np.arange(pairs)
        # rows: one cover row per chosen bucket, then one capacity row per type, then the cuts
        cover_row = pair_slot
        capacity_row = len(chosen) + pair_type
        rows = [cover_row, capacity_row, len(chosen) + np.arange(types)]
        cols = [k_cols, k_cols, np.arange(types)]
        values = [np.ones(pairs), self.slice_load[pair_type, pair_bucket], -np.ones(types)]
        row_lower = [np.full(len(chosen), float(self.slices)), np.full(types, -np.inf)]
        row_upper = [np.full(len(chosen), float(self.slices)), capacity]
        col_lower = [n_lower, np.zeros(pairs)]
        col_upper = [n_upper, np.full(pairs, float(self.slices))]
        integer = [np.ones(types, dtype=bool), np.full(pairs, integral)]
        next_row, next_col = len(chosen) + types, types + pairs
        for fleet in excluded:
            # n[g] >= fleet[g] + 1 for some g: binaries z[g] with n[g] >= lower + (fleet+1-lower) z[g]
            grow = np.nonzero(fleet < n_upper)[0]
            z = next_col + np.arange(len(grow))
            rows += [next_row + np.arange(len(grow)), next_row + np.arange(len(grow))]
            cols += [grow, z]
            values += [np.ones(len(grow)), -(fleet[grow] + 1 - n_lower[grow])]
            row_lower.append(n_lower[grow])
            row_upper.append(np.full(len(grow), np.inf))
            rows.append(np.full(len(grow), next_row + len(grow)))
            cols.append(z)
            values.append(np.ones(len(grow)))
            row_lower.append(np.ones(1))
            row_upper.append(np.full(1, np.inf))
            col_lower.append(np.zeros(len(grow)))
            col_upper.append(np.ones(len(grow)))
            integer.append(np.ones(len(grow), dtype=bool))
            next_row += len(grow) + 1
            next_col += len(grow)
        cost = np.zeros(next_col)
        if objective:
            cost[:types] = self.cost
        model = Milp(
            cost=cost,
            col_lower=np.concatenate(col_lower).astype(np.float64),
            col_upper=np.concatenate(col_upper).astype(np.float64),
            integer=np.concatenate(integer),
            rows=np.concatenate(rows).astype(np.int32),
            cols=np.concatenate(cols).astype(np.int32),
            values=np.concatenate(values).astype(np.float64),
            row_lower=np.concatenate(row_lower).astype(np.float64),
            row_upper=np.concatenate(row_upper).astype(np.float64),
        )
        return model, pair_type.astype(np.int32), pair_bucket.astype(np.int32)
