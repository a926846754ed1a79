"""Validation of allocation documents: each rule, with its exact message and field path."""

from __future__ import annotations

from typing import Any

import pytest

from melange import api
from tests.specs import with_value


def valid_spec() -> dict[str, Any]:
    return {
        "buckets": {"inputTokens": [1, 100, 1000], "outputTokens": [1, 100, 1000]},
        "workload": {"distribution": [[3, 1], [1, 1]], "totalRate": 4.0},
        "sliceFactor": 8,
        "gpus": [
            {"name": "L4", "costPerHour": 0.8, "throughput": [[20, 6], [8, 2]]},
            {"name": "A100", "costPerHour": 3.7, "throughput": [[60, 25], [40, 12]]},
        ],
    }


def errors_of(spec: dict[str, Any], prefix: str = "spec") -> list[str]:
    with pytest.raises(api.SpecError) as info:
        api.validate_spec(spec, prefix)
    return [str(e) for e in info.value.errors]


def test_valid_spec_parses_with_defaults() -> None:
    spec = api.validate_spec(valid_spec())
    assert spec.slice_factor == 8
    assert spec.headroom == 0.0
    assert spec.dry_run is False
    assert spec.rate_source is None
    assert [g.name for g in spec.gpus] == ["L4", "A100"]
    assert spec.gpus[0].min_replicas == 0
    assert spec.gpus[0].max_replicas is None


def mutate(path: str, value: Any) -> dict[str, Any]:
    return with_value(valid_spec(), path, value)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            "gpus.1.throughput.1.0",
            -1,
            "spec.gpus[1].throughput[1][0]: must be >= 0, got -1",
        ),
        (
            "gpus.0.throughput.0.1",
            float("nan"),
            "spec.gpus[0].throughput[0][1]: must be a finite number, got nan",
        ),
        (
            "workload.distribution.0.0",
            float("inf"),
            "spec.workload.distribution[0][0]: must be a finite number, got inf",
        ),
        (
            "workload.distribution.1.1",
            -0.5,
            "spec.workload.distribution[1][1]: must be >= 0, got -0.5",
        ),
        ("workload.totalRate", -2, "spec.workload.totalRate: must be >= 0, got -2"),
        ("gpus.0.costPerHour", 0, "spec.gpus[0].costPerHour: must be > 0, got 0"),
        ("sliceFactor", 0, "spec.sliceFactor: must be >= 1, got 0"),
        ("sliceFactor", 1025, "spec.sliceFactor: must be <= 1024, got 1025"),
        ("headroom", -0.1, "spec.headroom: must be >= 0, got -0.1"),
        ("gpus.0.minReplicas", -1, "spec.gpus[0].minReplicas: must be >= 0, got -1"),
        (
            "buckets.inputTokens",
            [1, 100, 100],
            "spec.buckets.inputTokens[2]: must be greater than the previous edge 100, got 100",
        ),
        (
            "buckets.outputTokens",
            [0, 100, 1000],
            "spec.buckets.outputTokens[0]: must be >= 1, got 0",
        ),
        (
            "buckets.outputTokens",
            [1, 2.5, 1000],
            "spec.buckets.outputTokens[1]: must be an integer, got 2.5",
        ),
        ("gpus.1.name", "L4", "spec.gpus[1].name: must be unique, 'L4' is also gpus[0]"),
        ("gpus", [], "spec.gpus: must have at least 1 items, got 0"),
        (
            "workload.distribution",
            [[1, 1]],
            "spec.workload.distribution: must have 2 rows (one per input bucket), got 1",
        ),
        (
            "gpus.1.throughput",
            [[1, 1], [1, 1, 1]],
            "spec.gpus[1].throughput[1]: must have 2 columns (one per output bucket), got 3",
        ),
        (
            "workload.distribution",
            [[0, 0], [0, 0]],
            "spec.workload.distribution: must have a positive sum when totalRate > 0",
        ),
        ("slicefactor", 4, "spec.slicefactor: is not a known field"),
        (
            "gpus.0.scaleTargetRef",
            {"kind": "Deployment", "name": "x"},
            "spec.gpus[0].scaleTargetRef.apiVersion: is required",
        ),
    ],
)
def test_each_rule_reports_path_and_value(path: str, value: Any, message: str) -> None:
    assert errors_of(mutate(path, value)) == [message]


def test_min_above_max() -> None:
    spec = valid_spec()
    spec["gpus"][0].update(minReplicas=3, maxReplicas=2)
    assert errors_of(spec) == ["spec.gpus[0].maxReplicas: must be >= minReplicas (3), got 2"]


def test_missing_required_sections() -> None:
    assert errors_of({"gpus": valid_spec()["gpus"]}) == [
        "spec.buckets: is required",
        "spec.workload: is required",
    ]


def test_all_errors_are_reported_at_once() -> None:
    spec = valid_spec()
    spec["gpus"][1]["throughput"][1][0] = -1
    spec["gpus"][1]["name"] = "L4"
    spec["workload"]["distribution"] = [[1, 1]]
    spec["sliceFactor"] = 0
    assert errors_of(spec) == [
        "spec.gpus[1].throughput[1][0]: must be >= 0, got -1",
        "spec.sliceFactor: must be >= 1, got 0",
        "spec.workload.distribution: must have 2 rows (one per input bucket), got 1",
        "spec.gpus[1].name: must be unique, 'L4' is also gpus[0]",
    ]


def test_zero_rate_with_empty_distribution_is_valid() -> None:
    spec = mutate("workload.distribution", [[0, 0], [0, 0]])
    spec["workload"]["totalRate"] = 0
    assert api.validate_spec(spec).workload.total_rate == 0


def test_full_manifest_and_bare_spec() -> None:
    manifest = {
        "apiVersion": "melange.dev/v1alpha1",
        "kind": "MelangeAllocation",
        "metadata": {"name": "chat", "namespace": "llm"},
        "spec": valid_spec(),
    }
    allocation = api.parse_document(manifest)
    assert (allocation.name, allocation.namespace) == ("chat", "llm")
    bare = api.parse_document(valid_spec())
    assert bare.spec == allocation.spec
    assert bare.name is None


def test_bare_spec_errors_have_no_spec_prefix() -> None:
    with pytest.raises(api.SpecError) as info:
        api.parse_document(mutate("sliceFactor", 0))
    assert [str(e) for e in info.value.errors] == ["sliceFactor: must be >= 1, got 0"]


def test_wrong_kind_and_version() -> None:
    with pytest.raises(api.SpecError) as info:
        api.parse_document({"apiVersion": "v1", "kind": "Pod", "spec": valid_spec()})
    assert [str(e) for e in info.value.errors] == [
        "kind: must be MelangeAllocation, got 'Pod'",
        "apiVersion: must be melange.dev/v1alpha1, got 'v1'",
    ]


def test_yaml_errors() -> None:
    with pytest.raises(api.SpecError, match=r"f.yaml: not valid YAML"):
        api.load_text("a: [1,", "f.yaml")
    with pytest.raises(api.SpecError, match="must hold exactly one document, got 2"):
        api.load_text("a: 1\n---\nb: 2\n", "f.yaml")
    with pytest.raises(api.SpecError, match=r"^document: must be a mapping, got 'hello'$"):
        api.load_text("hello")


def test_bucket_label_names_token_ranges() -> None:
    assert api.bucket_label([1, 16000, 32000], [1, 16000, 32000], 1, 1) == (
        "input 16000-32000, output 16000-32000 tokens"
    )
