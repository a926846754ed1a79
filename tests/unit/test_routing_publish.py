"""What the operator publishes for a router: the status fields and the ConfigMap's document."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml

from melange import api
from melange.controller import routing as publish
from melange.plan import routing, solver
from melange.plan.problem import Problem

EXAMPLE = Path(__file__).parents[2] / "examples" / "mixed.yaml"


def spec_with_upstreams() -> api.AllocationSpec:
    document = yaml.safe_load(EXAMPLE.read_text())
    document["spec"]["gpus"][0]["upstream"] = {"service": "llama-first", "port": 8000}
    document["spec"]["gpus"][1]["upstream"] = {"service": "llama-second", "port": "http"}
    return api.load_bytes(yaml.safe_dump(document).encode(), source="mixed").spec


def solved(spec: api.AllocationSpec) -> routing.RouteTable:
    plan = solver.solve(Problem.from_spec(spec))
    assert plan.solved
    return publish.table_for(spec, None, plan, "serving")


def test_the_table_names_the_upstreams_the_spec_gives() -> None:
    spec = spec_with_upstreams()
    table = solved(spec)
    first, second = spec.gpus[0].name, spec.gpus[1].name
    assert dict(table.upstreams) == {
        first: routing.Upstream(service="llama-first", port=8000, namespace="serving"),
        second: routing.Upstream(service="llama-second", port="http", namespace="serving"),
    }


def test_the_status_lists_each_input_bucket_with_the_types_it_goes_to() -> None:
    table = solved(spec_with_upstreams())
    status = publish.input_routing_status(table)
    edges = table.input_edges
    assert [row["inputTokens"] for row in status["inputRouting"]] == [
        [lo, hi] for lo, hi in itertools.pairwise(edges)
    ]
    for row, shares in zip(status["inputRouting"], table.by_input, strict=True):
        listed = {s["gpu"]: s["fraction"] for s in row["shares"]}
        assert listed == {
            g: pytest.approx(s, abs=1e-6) for g, s in zip(table.gpus, shares, strict=True) if s > 0
        }
        assert sum(listed.values()) == pytest.approx(1.0, abs=1e-5)
    assert status["inputRoutingError"] == pytest.approx(table.input_load_error, abs=1e-6)
    assert publish.input_routing_status(None) == {"inputRouting": None, "inputRoutingError": None}


def test_the_document_is_stable_and_names_the_upstreams_namespace() -> None:
    table = solved(spec_with_upstreams())
    text = publish.document(table)
    assert text == publish.document(solved(spec_with_upstreams()))
    data = json.loads(text)
    assert {gpu: up["namespace"] for gpu, up in data["upstreams"].items()} == {
        gpu: "serving" for gpu, _ in table.upstreams
    }
    again = routing.from_dict(data)
    assert again.gpus == table.gpus
    for got, want in zip(again.by_input, table.by_input, strict=True):
        assert got == pytest.approx(want, abs=1e-11)


def test_the_configmap_name_fits_or_the_condition_says_why_not() -> None:
    assert publish.config_map_name("chat") == "chat-routing"
    longest = "a" * (publish.MAX_NAME - len(publish.CONFIG_MAP_SUFFIX))
    assert publish.config_map_name(longest) == longest + "-routing"
    assert publish.config_map_name(longest + "a") is None
    condition = publish.name_too_long(longest + "a")
    assert (condition.status, condition.reason) == ("False", "NameTooLong")
    assert "shorter name" in condition.message
