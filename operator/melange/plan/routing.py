"""The routing table of a plan: which share of each bucket's requests goes to which GPU type.

A plan assigns every (input, output) bucket's traffic to GPU types in shares (`Plan.assignment`),
and sizes each type for the load those shares give it: `L_g = sum_ij rate_ij * f_ijg / T_g[i][j]`
instances' worth (`GpuResult.load`). A gateway that knows both lengths of a request (a client
whose `max_tokens` is its real output length) can apply those shares as they are: `by_bucket`.

On arrival a gateway usually knows only the input length. `by_input` gives, per input bucket `i`,
the share `p_ig` of its requests to send to type `g`. The assumption that makes this well defined:
**within an input bucket, the output length of a request follows the workload matrix's row
(`rate_ij / rate_i`), whatever type it is sent to** (the router cannot see it, so it cannot
correlate with the choice). A type sent share `p_ig` of row `i` then carries the expected load
`p_ig * W_ig`, with `W_ig = sum_j rate_ij / T_g[i][j]` (requests weighted by 1 / throughput of
their bucket), and the shares are chosen so that every type's expected load equals what the plan
sized it for: `sum_i p_ig * W_ig = L_g`.

That system has a solution whenever the plan splits each input row between types in the same
proportions for every output bucket (then the plan's own request shares solve it), and usually
when there are more input buckets than types in use. It has none when a row's split depends on
the output length in a way the other rows cannot make up for (short answers to an L4, long ones
to an A100, in a one-row workload): no output-blind router can give both types their planned
load. The shares are therefore the solution of two small linear programs: first the least
possible largest relative deviation from the planned loads (`max_g |load_g / L_g - 1|`, 0 when
the system is solvable; reported as `input_load_error`), then, at that deviation, the fewest
requests moved away from the plan's own per-row request shares (so a plan that already suits an
output-blind router is kept as it is). Only types the plan uses (`L_g > 0`), and only types that
serve every bucket of a row with traffic, get a share of that row; a row that no type in use
serves whole keeps the plan's own request shares, and its load is counted as the plan's (a
router that sends such a row by input length alone sends some requests to a type that cannot
serve them: route it by both lengths).

Buckets the plan has no traffic for still get shares, so that an unexpected request is routed
too: in proportion to the capacity the fleet has for that bucket (`replicas_g * T_g[i][j]`; for a
row, with its output buckets weighted equally), and when no type in the fleet serves it, in
proportion to the replicas. A request below the first edge or at or above the last edge of an
axis is routed as one of the nearest bucket.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from melange.plan import highs
from melange.plan.problem import Problem
from melange.plan.result import Plan

SCHEMA_VERSION = 1
_SHARE_DIGITS = 12  # shares in the JSON form; enough that reloaded loads match to ~1e-11
_TOLERANCE = 1e-9


Shares = tuple[float, ...]


@dataclass(frozen=True)
class Upstream:
    """Where a GPU type's model servers are: a Service (its EndpointSlices list the servers)."""

    service: str
    port: int | str  # the Service port's number or name
    namespace: str | None = None  # None: the namespace of whoever reads the table


@dataclass(frozen=True)
class RouteTable:
    """A plan's routing table; shares are per GPU type, in the order of `gpus`, and sum to 1."""

    input_edges: tuple[int, ...]
    output_edges: tuple[int, ...]
    gpus: tuple[str, ...]
    by_input: tuple[Shares, ...]  # [input bucket][gpu]
    by_bucket: tuple[tuple[Shares, ...], ...]  # [input bucket][output bucket][gpu]
    plan_load: tuple[float, ...] = ()  # instances' worth the plan sized each type for
    input_load: tuple[float, ...] = ()  # the expected load of each type under `by_input`
    input_load_error: float = 0.0  # max_g |input_load_g / plan_load_g - 1| over the used types
    upstreams: tuple[tuple[str, Upstream], ...] = ()  # (gpu, its servers), for the types that have
    _cumulative_input: tuple[Shares, ...] = field(default=(), init=False, repr=False, compare=False)
    _cumulative_bucket: tuple[tuple[Shares, ...], ...] = field(
        default=(), init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        """Check the shapes once, and keep cumulative shares so that `pick` is a bisection."""
        rows, cols, types = len(self.input_edges) - 1, len(self.output_edges) - 1, len(self.gpus)
        if rows < 1 or cols < 1 or types < 1:
            raise ValueError("a routing table needs at least one bucket per axis and one GPU type")
        if len(self.by_input) != rows or len(self.by_bucket) != rows:
            raise ValueError(f"a routing table needs {rows} input rows")
        for shares in (*self.by_input, *(s for row in self.by_bucket for s in row)):
            if len(shares) != types or any(not (0 <= s <= 1) for s in shares):
                raise ValueError(f"every share list needs {types} shares within 0..1")
        if any(len(row) != cols for row in self.by_bucket):
            raise ValueError(f"every row of byBucket needs {cols} output buckets")
        if unknown := sorted({gpu for gpu, _ in self.upstreams} - set(self.gpus)):
            raise ValueError(f"upstreams: {', '.join(unknown)} is not a GPU type of the table")
        object.__setattr__(self, "_cumulative_input", tuple(map(_cumulative, self.by_input)))
        object.__setattr__(
            self,
            "_cumulative_bucket",
            tuple(tuple(map(_cumulative, row)) for row in self.by_bucket),
        )

    def upstream(self, gpu: str) -> Upstream | None:
        """The servers of `gpu`, when the table names them."""
        return dict(self.upstreams).get(gpu)


def with_upstreams(table: RouteTable, upstreams: Mapping[str, Upstream]) -> RouteTable:
    """`table` naming the servers of its types (an allocation's `gpus[].upstream`)."""
    named = tuple((gpu, upstreams[gpu]) for gpu in table.gpus if gpu in upstreams)
    return replace(table, upstreams=named)


def _cumulative(shares: Shares) -> Shares:
    total, out = 0.0, []
    for share in shares:
        total += share
        out.append(total)
    return tuple(out)


def _index(edges: Sequence[int], tokens: int) -> int:
    """The bucket of `tokens`; below the first edge the first, at or above the last the last."""
    return min(max(bisect_right(edges, tokens) - 1, 0), len(edges) - 2)


def bucket_index(edges: Sequence[int], tokens: int) -> int:
    """The bucket of `tokens` on one axis, clamped as `pick` clamps it (for labels and logs)."""
    return _index(edges, tokens)


def pick(table: RouteTable, input_tokens: int, output_tokens: int | None, u: float) -> str:
    """The GPU type for one request, from a uniform `u` in [0, 1): by both lengths when the
    output length is known, else by the input length alone. Raises ValueError when the table
    routes that bucket nowhere (a fleet with no instance at all)."""
    i = _index(table.input_edges, input_tokens)
    if output_tokens is None:
        cumulative = table._cumulative_input[i]
    else:
        cumulative = table._cumulative_bucket[i][_index(table.output_edges, output_tokens)]
    total = cumulative[-1]
    if total <= 0:
        raise ValueError(f"the routing table sends input bucket {i} nowhere")
    g = bisect_right(cumulative, u * total)
    return table.gpus[min(g, len(table.gpus) - 1)]


def restricted(table: RouteTable, present: Collection[str]) -> RouteTable:
    """The table for a fleet that has only the types in `present`: the others' shares go to them
    in proportion (a row left with none is split evenly among them)."""
    if all(name in present for name in table.gpus):
        return table
    mask = [1.0 if name in present else 0.0 for name in table.gpus]

    def renormalised(shares: Shares) -> Shares:
        kept = [s * m for s, m in zip(shares, mask, strict=True)]
        total = sum(kept)
        if total > 0:
            return tuple(s / total for s in kept)
        count = sum(mask)
        return tuple(m / count for m in mask) if count else tuple(kept)

    return RouteTable(
        input_edges=table.input_edges,
        output_edges=table.output_edges,
        gpus=table.gpus,
        by_input=tuple(renormalised(s) for s in table.by_input),
        by_bucket=tuple(tuple(renormalised(s) for s in row) for row in table.by_bucket),
        plan_load=table.plan_load,
        input_load=table.input_load,
        input_load_error=table.input_load_error,
    )


def chooser(
    table: RouteTable, present: Collection[str] | None = None
) -> Callable[[int, int | None, float], str]:
    """`pick` bound to a table (restricted to the types `present`, when given)."""
    bound = table if present is None else restricted(table, present)

    def choose(input_tokens: int, output_tokens: int | None, u: float) -> str:
        return pick(bound, input_tokens, output_tokens, u)

    return choose


def derive(problem: Problem, plan: Plan) -> RouteTable:
    """The routing table of `plan`, solved for `problem` (its rates and throughputs)."""
    if not plan.solved:
        raise ValueError(f"a {plan.status} plan has no routing table")
    rows, cols, types = (
        len(problem.input_edges) - 1,
        len(problem.output_edges) - 1,
        len(problem.gpus),
    )
    names = tuple(g.name for g in problem.gpus)
    index = {name: g for g, name in enumerate(names)}
    rates = np.array(problem.rates, dtype=np.float64).reshape(rows, cols)
    throughput = np.array([g.throughput for g in problem.gpus], dtype=np.float64)
    replicas = np.array([plan.replicas().get(name, 0) for name in names], dtype=np.float64)
    fractions = np.zeros((rows, cols, types))
    for bucket in plan.assignment:
        i = problem.input_edges.index(bucket.input_tokens[0])
        j = problem.output_edges.index(bucket.output_tokens[0])
        for share in bucket.shares:
            fractions[i, j, index[share.gpu]] += share.fraction
    with np.errstate(divide="ignore"):
        inverse = np.where(throughput > 0, 1.0 / np.where(throughput > 0, throughput, 1.0), np.inf)
    # inverse[g, i, j]: instances one req/s of bucket (i, j) occupies on g (inf: cannot serve)
    planned = rates > 0
    with np.errstate(invalid="ignore"):
        per_cell = np.where(
            fractions > 0, rates[:, :, None] * fractions * inverse.transpose(1, 2, 0), 0.0
        )
    plan_load = per_cell.sum(axis=(0, 1))

    by_bucket = np.zeros((rows, cols, types))
    for i in range(rows):
        for j in range(cols):
            if planned[i, j] and fractions[i, j].sum() > 0:
                by_bucket[i, j] = fractions[i, j]
            else:
                by_bucket[i, j] = _spare(replicas * throughput[:, i, j], replicas)

    # W[i, g]: the load of all of row i on type g (inf when g misses one of its buckets)
    row_rate = rates.sum(axis=1)
    weight = np.zeros((rows, types))
    for i in range(rows):
        for g in range(types):
            cells = planned[i]
            weight[i, g] = (
                float(np.sum(rates[i, cells] * inverse[g, i, cells])) if cells.any() else 0.0
            )
    natural = np.zeros((rows, types))  # the plan's own request shares per row
    for i in range(rows):
        if row_rate[i] > 0:
            natural[i] = (rates[i][:, None] * fractions[i]).sum(axis=0) / row_rate[i]
    by_input, error = _input_shares(weight, natural, row_rate, plan_load, per_cell.sum(axis=1))
    for i in range(rows):
        if row_rate[i] <= 0:
            with np.errstate(divide="ignore"):
                row_capacity = np.where(
                    (throughput[:, i, :] > 0).all(axis=1),
                    1.0 / np.sum(inverse[:, i, :], axis=1),
                    0.0,
                )
            by_input[i] = _spare(replicas * row_capacity, replicas)
    # rows routed to types that serve all of them; the others count as the plan's own load
    finite = np.asarray(
        np.isfinite(np.where(by_input > 0, weight, 0.0)).all(axis=1), dtype=np.bool_
    )
    with np.errstate(invalid="ignore"):
        blind = np.where(by_input > 0, by_input * weight, 0.0)
    input_load = np.where(finite[:, None], blind, per_cell.sum(axis=1))[row_rate > 0].sum(axis=0)
    return RouteTable(
        input_edges=tuple(problem.input_edges),
        output_edges=tuple(problem.output_edges),
        gpus=names,
        by_input=tuple(tuple(float(s) for s in row) for row in by_input),
        by_bucket=tuple(tuple(tuple(float(s) for s in cell) for cell in row) for row in by_bucket),
        plan_load=tuple(float(v) for v in plan_load),
        input_load=tuple(float(v) for v in input_load),
        input_load_error=error,
    )


def _spare(capacity: np.ndarray, replicas: np.ndarray) -> np.ndarray:
    """Shares for traffic the plan did not expect: by capacity, else by instances, else none."""
    for weights in (capacity, replicas):
        total = float(weights.sum())
        if total > 0:
            return np.asarray(weights / total, dtype=np.float64)
    return np.zeros_like(replicas, dtype=np.float64)


@dataclass
class _Rows:
    """A sparse constraint matrix, built row by row."""

    rows: list[int] = field(default_factory=list)
    cols: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    lower: list[float] = field(default_factory=list)
    upper: list[float] = field(default_factory=list)

    def add(self, terms: Sequence[tuple[int, float]], lower: float, upper: float) -> None:
        row = len(self.lower)
        for col, value in terms:
            self.rows.append(row)
            self.cols.append(col)
            self.values.append(value)
        self.lower.append(lower)
        self.upper.append(upper)

    def milp(self, cost: np.ndarray, col_upper: np.ndarray) -> highs.Milp:
        return highs.Milp(
            cost=cost,
            col_lower=np.zeros(len(cost)),
            col_upper=col_upper,
            integer=np.zeros(len(cost), dtype=np.bool_),
            rows=np.array(self.rows, dtype=np.int32),
            cols=np.array(self.cols, dtype=np.int32),
            values=np.array(self.values, dtype=np.float64),
            row_lower=np.array(self.lower, dtype=np.float64),
            row_upper=np.array(self.upper, dtype=np.float64),
        )


def _input_shares(
    weight: np.ndarray,
    natural: np.ndarray,
    row_rate: np.ndarray,
    plan_load: np.ndarray,
    row_load: np.ndarray,
) -> tuple[np.ndarray, float]:
    """Per-row shares whose expected loads are closest to the plan's (see the module docstring),
    and the largest relative deviation left.

    Columns: the share `p_k` of each allowed (row, type) pair, then the deviation `t`, then (second
    program only) `d_k >= |p_k - natural|`, the requests moved away from the plan's own shares.
    """
    rows, types = weight.shape
    shares = np.zeros((rows, types))
    used = plan_load > _TOLERANCE * max(1.0, float(plan_load.max(initial=0.0)))
    pairs = [
        (i, g)
        for i in range(rows)
        if row_rate[i] > 0
        for g in range(types)
        if used[g] and math.isfinite(weight[i, g])
    ]
    covered = {i for i, _ in pairs}
    fixed_load = np.zeros(types)
    for i in range(rows):
        if row_rate[i] > 0 and i not in covered:
            # no type in use serves the whole row: keep the plan's own shares for it, and count
            # the plan's own load for it (what it gives where the router does know the length)
            shares[i] = natural[i]
            fixed_load += row_load[i]
    if not pairs:
        return shares, 0.0
    n = len(pairs)
    t = n
    base = _Rows()
    for i in sorted(covered):  # each row's shares sum to 1
        base.add([(k, 1.0) for k, (r, _) in enumerate(pairs) if r == i], 1.0, 1.0)
    for g in range(types):  # -t <= load_g / L_g - 1 <= t
        if not used[g]:
            continue
        terms = [(k, weight[i, g] / plan_load[g]) for k, (i, h) in enumerate(pairs) if h == g]
        target = 1.0 - fixed_load[g] / plan_load[g]
        base.add([*terms, (t, -1.0)], -np.inf, target)
        base.add([*terms, (t, 1.0)], target, np.inf)

    upper = np.full(n + 1, np.inf)
    upper[:n] = 1.0
    cost = np.zeros(n + 1)
    cost[t] = 1.0
    first = highs.solve(base.milp(cost, upper))
    if first.x is None:
        raise ValueError("the routing shares' linear program has no solution")
    deviation = max(float(first.x[t]), 0.0)

    moved = base
    for k, (i, g) in enumerate(pairs):
        moved.add([(k, -1.0), (n + 1 + k, 1.0)], -natural[i, g], np.inf)
        moved.add([(k, 1.0), (n + 1 + k, 1.0)], natural[i, g], np.inf)
    upper = np.concatenate([upper, np.full(n, np.inf)])
    upper[t] = deviation + _TOLERANCE * (1.0 + deviation)
    total = float(row_rate.sum())
    cost = np.concatenate([np.zeros(n + 1), [row_rate[i] / total for i, _ in pairs]])
    second = highs.solve(moved.milp(cost, upper))
    x = second.x if second.x is not None else first.x
    for k, (i, g) in enumerate(pairs):
        shares[i, g] = min(max(float(x[k]), 0.0), 1.0)
    for i in covered:
        shares[i, shares[i] < 1e-12] = 0.0
        shares[i] /= shares[i].sum()
    return shares, deviation


def load_under(table: RouteTable, problem: Problem, by_bucket: bool) -> list[float]:
    """Each type's expected load (instances' worth) when `problem`'s traffic is routed by the
    table: the check that the shares give every type what the plan sized it for."""
    loads = [0.0] * len(table.gpus)
    index = {name: g for g, name in enumerate(table.gpus)}
    for i, row in enumerate(problem.rates):
        for j, rate in enumerate(row):
            if rate <= 0:
                continue
            shares = table.by_bucket[i][j] if by_bucket else table.by_input[i]
            for gpu in problem.gpus:
                share = shares[index[gpu.name]]
                if share > 0:
                    t = gpu.throughput[i][j]
                    loads[index[gpu.name]] += rate * share / t if t > 0 else math.inf
    return loads


# --- the JSON form ----------------------------------------------------------------------------------


def to_dict(table: RouteTable) -> dict[str, Any]:
    """The versioned JSON form (schema: `routing-schema.json` next to this module, docs/routing.md)."""

    def rounded(shares: Shares) -> list[float]:
        return [round(s, _SHARE_DIGITS) for s in shares]

    document: dict[str, Any] = {
        "schemaVersion": SCHEMA_VERSION,
        "buckets": {
            "inputTokens": list(table.input_edges),
            "outputTokens": list(table.output_edges),
        },
        "gpus": list(table.gpus),
        "byInput": [rounded(s) for s in table.by_input],
        "byBucket": [[rounded(s) for s in row] for row in table.by_bucket],
        "loads": {
            "plan": [round(v, _SHARE_DIGITS) for v in table.plan_load],
            "byInput": [round(v, _SHARE_DIGITS) for v in table.input_load],
            "byInputError": round(table.input_load_error, _SHARE_DIGITS),
        },
    }
    if table.upstreams:
        document["upstreams"] = {
            gpu: {
                **({"namespace": up.namespace} if up.namespace else {}),
                "service": up.service,
                "port": up.port,
            }
            for gpu, up in table.upstreams
        }
    return document


def _upstream(gpu: str, data: Any) -> Upstream:
    if not isinstance(data, Mapping):
        raise ValueError(f"upstreams.{gpu}: must be a mapping")
    service, port, namespace = data.get("service"), data.get("port"), data.get("namespace")
    if not isinstance(service, str) or not service:
        raise ValueError(f"upstreams.{gpu}.service: must be a Service name")
    if isinstance(port, bool) or not isinstance(port, int | str) or port in ("", 0):
        raise ValueError(f"upstreams.{gpu}.port: must be a port number or name")
    if namespace is not None and (not isinstance(namespace, str) or not namespace):
        raise ValueError(f"upstreams.{gpu}.namespace: must be a namespace name")
    return Upstream(service=service, port=port, namespace=namespace)


def from_dict(data: Any) -> RouteTable:
    """A table from its JSON form; a document of another schema version or shape is refused
    with a ValueError naming the field."""
    if not isinstance(data, Mapping):
        raise ValueError("a routing table must be a mapping")
    version = data.get("schemaVersion")
    if version != SCHEMA_VERSION:
        raise ValueError(f"schemaVersion: must be {SCHEMA_VERSION}, got {version!r}")
    buckets = data.get("buckets")
    if not isinstance(buckets, Mapping):
        raise ValueError("buckets: must be a mapping")
    loads = data.get("loads", {})
    if not isinstance(loads, Mapping):
        raise ValueError("loads: must be a mapping")
    upstreams = data.get("upstreams", {})
    if not isinstance(upstreams, Mapping):
        raise ValueError("upstreams: must be a mapping")
    try:
        return RouteTable(
            input_edges=tuple(int(e) for e in buckets["inputTokens"]),
            output_edges=tuple(int(e) for e in buckets["outputTokens"]),
            gpus=tuple(str(g) for g in data["gpus"]),
            by_input=tuple(tuple(float(s) for s in row) for row in data["byInput"]),
            by_bucket=tuple(
                tuple(tuple(float(s) for s in cell) for cell in row) for row in data["byBucket"]
            ),
            plan_load=tuple(float(v) for v in loads.get("plan", ())),
            input_load=tuple(float(v) for v in loads.get("byInput", ())),
            input_load_error=float(loads.get("byInputError", 0.0)),
            upstreams=tuple((str(gpu), _upstream(str(gpu), up)) for gpu, up in upstreams.items()),
        )
    except KeyError as exc:
        raise ValueError(f"{exc.args[0]}: is required") from None
    except TypeError as exc:
        raise ValueError(f"not a routing table: {exc}") from None
