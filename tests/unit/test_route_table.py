"""The routing table gives every GPU type the load its plan sized it for: exactly when both lengths
are known, and as closely as an output-blind router can when only the input length is."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from melange import api
from melange.plan import routing as route
from melange.plan import solver
from melange.plan.problem import GpuOption, Problem

EXAMPLES = Path(__file__).parents[2] / "examples"
SCHEMA = Path(route.__file__).with_name("routing-schema.json")
# the project's profile: derandomized (a fixed seed) wherever it runs, as CI runs every property
SETTINGS = settings(
    settings.get_profile("ci"),
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def example(name: str) -> tuple[Problem, route.RouteTable, list[float]]:
    spec = api.load_bytes((EXAMPLES / name).read_bytes(), source=name).spec
    problem = Problem.from_spec(spec)
    plan = solver.solve(problem)
    return problem, route.derive(problem, plan), [g.load for g in plan.gpus]


@pytest.mark.parametrize("name", ["conversational.yaml", "document.yaml", "mixed.yaml"])
def test_the_examples_tables_give_each_type_its_planned_load(name: str) -> None:
    problem, table, planned = example(name)
    assert table.plan_load == pytest.approx(planned, rel=1e-9, abs=1e-12)
    assert route.load_under(table, problem, by_bucket=True) == pytest.approx(planned, rel=1e-9)
    by_input = route.load_under(table, problem, by_bucket=False)
    assert by_input == pytest.approx(list(table.input_load), rel=1e-9)
    for load, plan_load in zip(by_input, planned, strict=True):
        if plan_load > 0:
            assert abs(load / plan_load - 1) <= table.input_load_error + 1e-7
        else:
            assert load == 0
    for shares in (*table.by_input, *(s for row in table.by_bucket for s in row)):
        assert sum(shares) == pytest.approx(1.0)


def test_an_output_blind_router_cannot_split_one_row_by_output_length() -> None:
    """One input bucket whose short answers suit one type and long answers another: no share
    of the row gives both their planned load; the shares that miss least, and by how much."""
    problem = Problem(
        input_edges=(1, 100),
        output_edges=(1, 100, 1000),
        rates=((10.0, 10.0),),
        gpus=(
            GpuOption("small", 1.0, ((10.0, 0.5),)),
            GpuOption("large", 3.0, ((12.0, 5.0),)),
        ),
        slice_factor=1,
    )
    plan = solver.solve(problem)
    table = route.derive(problem, plan)
    assert [s.gpu for b in plan.assignment for s in b.shares] == ["small", "large"]
    assert table.plan_load == pytest.approx((1.0, 2.0))  # 10 / 10 and 10 / 5
    assert route.load_under(table, problem, by_bucket=True) == pytest.approx([1.0, 2.0])
    # sent share p of the row, small carries 21 p (10 / 10 + 10 / 0.5), large (1 - p) 17 / 6:
    # the largest relative deviation is least where 21 p - 1 = 17 / 12 (1 - p) - 1
    p = (17 / 12) / (21 + 17 / 12)
    assert table.by_input[0] == pytest.approx((p, 1 - p))
    assert table.input_load_error == pytest.approx(21 * p - 1)
    assert route.load_under(table, problem, by_bucket=False) == pytest.approx(
        [21 * p, 17 / 6 * (1 - p)]
    )


@st.composite
def problems(draw: st.DrawFn) -> Problem:
    rows, cols, types = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    rate = st.sampled_from([0.0, 0.5, 1.0, 3.0, 10.0])
    rates = tuple(tuple(draw(rate) for _ in range(cols)) for _ in range(rows))
    if not any(any(row) for row in rates):
        rates = ((1.0, *rates[0][1:]), *rates[1:])
    throughput = st.sampled_from([0.0, 0.3, 1.0, 2.5, 8.0, 20.0])
    gpus = []
    for g in range(types):
        matrix = [[draw(throughput) for _ in range(cols)] for _ in range(rows)]
        if g == 0:  # one type serves everything, so the problem is feasible
            matrix = [[v or 1.0 for v in row] for row in matrix]
        gpus.append(
            GpuOption(
                f"g{g}",
                draw(st.sampled_from([0.5, 1.0, 2.2, 4.0])),
                tuple(tuple(row) for row in matrix),
            )
        )
    return Problem(
        input_edges=tuple(range(1, rows + 2)),
        output_edges=tuple(range(1, cols + 2)),
        rates=rates,
        gpus=tuple(gpus),
        slice_factor=draw(st.integers(1, 4)),
        headroom=draw(st.sampled_from([0.0, 0.2])),
    )


@SETTINGS
@given(problems())
def test_derived_loads_match_the_plans(problem: Problem) -> None:
    plan = solver.solve(problem, time_limit=10)
    assert plan.solved
    table = route.derive(problem, plan)
    planned = [g.load for g in plan.gpus]
    assert list(table.plan_load) == pytest.approx(planned, rel=1e-9, abs=1e-12)
    # both lengths known: exactly the plan's loads
    assert route.load_under(table, problem, by_bucket=True) == pytest.approx(
        planned, rel=1e-9, abs=1e-12
    )
    # the input length alone: within the reported error, which is 0 with one output bucket (a
    # row no type in use serves whole keeps the plan's shares: some of it cannot be served blind)
    by_input = route.load_under(table, problem, by_bucket=False)
    if not all(math.isfinite(load) for load in by_input):
        return
    for load, plan_load in zip(by_input, planned, strict=True):
        if plan_load > 0:
            assert abs(load / plan_load - 1) <= table.input_load_error + 1e-6
        else:
            assert load == 0
    if len(problem.output_edges) == 2:
        assert table.input_load_error == pytest.approx(0.0, abs=1e-7)
    for row in table.by_input:
        assert sum(row) == pytest.approx(1.0)


@SETTINGS
@given(problems())
def test_a_plan_that_splits_rows_alike_keeps_its_own_shares(problem: Problem) -> None:
    """With one output bucket the plan's own request shares solve the system: nothing moves."""
    single = Problem(
        input_edges=problem.input_edges,
        output_edges=problem.output_edges[:2],
        rates=tuple((sum(row),) for row in problem.rates),
        gpus=tuple(
            GpuOption(g.name, g.cost_per_hour, tuple((row[0],) for row in g.throughput))
            for g in problem.gpus
        ),
        slice_factor=problem.slice_factor,
        headroom=problem.headroom,
    )
    plan = solver.solve(single, time_limit=10)
    table = route.derive(single, plan)
    for i, row in enumerate(single.rates):
        if row[0] > 0:
            assert table.by_input[i] == pytest.approx(table.by_bucket[i][0], abs=1e-7)


def test_a_row_no_type_serves_whole_keeps_the_plans_shares() -> None:
    problem = Problem(
        input_edges=(1, 10, 100),
        output_edges=(1, 10, 100),
        rates=((5.0, 5.0), (5.0, 5.0)),
        gpus=(
            GpuOption("a", 1.0, ((10.0, 0.0), (10.0, 10.0))),
            GpuOption("b", 1.0, ((0.0, 10.0), (1.0, 1.0))),
        ),
        slice_factor=1,
    )
    plan = solver.solve(problem)
    table = route.derive(problem, plan)
    assert table.by_input[0] == pytest.approx((0.5, 0.5))  # the plan's own request shares
    assert table.input_load == pytest.approx(table.plan_load)
    assert math.isinf(route.load_under(table, problem, by_bucket=False)[0])  # misrouted blind


def test_pick_follows_the_shares() -> None:
    _, table, _ = example("mixed.yaml")
    i = 5  # input bucket [1000, 2000): split between L40S and A100-80GB by input length
    shares = dict(zip(table.gpus, table.by_input[i], strict=True))
    draws = 20_000
    counts = Counter(route.pick(table, 1500, None, (k + 0.5) / draws) for k in range(draws))
    for gpu, share in shares.items():
        assert counts[gpu] / draws == pytest.approx(share, abs=2 / draws)
    # both lengths known: the plan's shares for that bucket
    cell = dict(zip(table.gpus, table.by_bucket[0][5], strict=True))
    assert route.pick(table, 10, 1500, 0.0) == max(cell, key=lambda g: cell[g] > 0)


def test_pick_routes_sizes_beyond_the_edges_as_the_nearest_bucket() -> None:
    _, table, _ = example("mixed.yaml")
    for u in (0.0, 0.3, 0.999):
        assert route.pick(table, 0, None, u) == route.pick(table, 1, None, u)
        assert route.pick(table, 10**6, 10**6, u) == route.pick(table, 7999, 1999, u)


def test_buckets_without_planned_traffic_are_routed_by_capacity() -> None:
    spec = api.load_bytes((EXAMPLES / "conversational.yaml").read_bytes(), source="c").spec
    problem = Problem.from_spec(spec)
    plan = solver.solve(problem)
    table = route.derive(problem, plan)
    unplanned = [(i, j) for i, row in enumerate(problem.rates) for j, r in enumerate(row) if r == 0]
    for i, j in unplanned:
        shares = table.by_bucket[i][j]
        assert sum(shares) == pytest.approx(1.0)
        for name, share in zip(table.gpus, shares, strict=True):
            if plan.replicas()[name] == 0:
                assert share == 0


def test_the_json_form_round_trips_and_matches_its_schema() -> None:
    _, plain, _ = example("mixed.yaml")
    first, second = plain.gpus[:2]
    table = route.with_upstreams(
        plain,
        {
            first: route.Upstream(service="llama-a", port=8000),
            second: route.Upstream(service="llama-b", port="http", namespace="serving"),
            "not-in-the-table": route.Upstream(service="x", port=1),
        },
    )
    assert [gpu for gpu, _ in table.upstreams] == [first, second]
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert schema["properties"]["schemaVersion"] == {"const": route.SCHEMA_VERSION}
    for each in (plain, table):
        data = route.to_dict(each)
        jsonschema.Draft202012Validator(schema).validate(data)
        again = route.from_dict(json.loads(json.dumps(data)))
        assert again.gpus == each.gpus
        assert again.input_edges == each.input_edges
        assert again.upstreams == each.upstreams
        for a, b in zip(again.by_input, each.by_input, strict=True):
            assert a == pytest.approx(b, abs=1e-11)
    assert route.to_dict(table)["upstreams"][second] == {
        "namespace": "serving",
        "service": "llama-b",
        "port": "http",
    }
    assert table.upstream(first) == route.Upstream(service="llama-a", port=8000)
    assert "upstreams" not in route.to_dict(plain)
    assert plain.upstream(first) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schemaVersion": 2}, "schemaVersion: must be 1, got 2"),
        ({"byInput": [[1.0]]}, "input rows"),
        ({"gpus": None}, "not a routing table"),
        ({"upstreams": {"nope": {"service": "s", "port": 1}}}, "nope is not a GPU type"),
        ({"upstreams": {"L4": {"port": 1}}}, r"upstreams.L4.service: must be a Service name"),
        ({"upstreams": {"L4": {"service": "s", "port": True}}}, r"upstreams.L4.port"),
        ({"upstreams": []}, "upstreams: must be a mapping"),
    ],
)
def test_another_version_or_shape_is_refused(change: dict[str, object], message: str) -> None:
    _, table, _ = example("document.yaml")
    data = {**route.to_dict(table), **change}
    with pytest.raises(ValueError, match=message):
        route.from_dict(data)


def test_an_unsolved_plan_has_no_table() -> None:
    problem = Problem((1, 2), (1, 2), ((1.0,),), (GpuOption("a", 1.0, ((0.0,),)),))
    plan = solver.solve(problem)
    assert plan.status == "Infeasible"
    with pytest.raises(ValueError, match="Infeasible plan has no routing table"):
        route.derive(problem, plan)
    assert math.isfinite(plan.total_rate)
