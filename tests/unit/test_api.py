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
            "spec.workload.distribution: must be 2 x 2: 2 rows (one per input bucket) of 2 columns "
            "(one per output bucket), as the bucket edges give; got 1 x 2",
        ),
        (
            "gpus.1.throughput",
            [[1, 1], [1, 1, 1]],
            "spec.gpus[1].throughput: must be 2 x 2: 2 rows (one per input bucket) of 2 columns "
            "(one per output bucket), as the bucket edges give; got 2 rows of 2 or 3 columns "
            "(row 1 has 3)",
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
        "spec.workload.distribution: must be 2 x 2: 2 rows (one per input bucket) of 2 columns "
        "(one per output bucket), as the bucket edges give; got 1 x 2",
        "spec.gpus[1].name: must be unique, 'L4' is also gpus[0]",
    ]


def test_zero_rate_with_empty_distribution_is_valid() -> None:
    spec = mutate("workload.distribution", [[0, 0], [0, 0]])
    spec["workload"]["totalRate"] = 0
    assert api.validate_spec(spec).workload.total_rate == 0


def test_full_manifest_and_bare_spec() -> None:
    spec = valid_spec()
    manifest = {
        "apiVersion": "melange.dev/v1alpha1",
        "kind": "MelangeAllocation",
        "metadata": {"name": "chat", "namespace": "llm"},
        "spec": spec,
    }
    for k, gpu in enumerate(spec["gpus"]):  # an object needs its node pools
        gpu["scaleTargetRef"] = {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"p{k}"}
    allocation = api.parse_document(manifest)
    assert (allocation.name, allocation.namespace) == ("chat", "llm")
    bare = api.parse_document(valid_spec())
    assert bare.spec.gpus[0].scale_target_ref is None
    assert bare.spec.buckets == allocation.spec.buckets
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
    with pytest.raises(api.SpecError, match=r"f.yaml: holds 2 YAML documents"):
        api.load_text("a: 1\n---\nb: 2\n", "f.yaml")
    with pytest.raises(api.SpecError, match=r"^document: must be a mapping, got 'hello'$"):
        api.load_text("hello")


def test_bucket_label_names_token_ranges() -> None:
    assert api.bucket_label([1, 16000, 32000], [1, 16000, 32000], 1, 1) == (
        "input 16000-32000, output 16000-32000 tokens"
    )


def target(name: str, api_version: str = "cluster.x-k8s.io/v1beta1") -> dict[str, str]:
    return {"apiVersion": api_version, "kind": "MachineDeployment", "name": name}


def with_targets(*refs: dict[str, str]) -> dict[str, Any]:
    spec = valid_spec()
    spec["gpus"].append({"name": "A10G", "costPerHour": 1.0, "throughput": [[30, 9], [12, 3]]})
    for gpu, ref in zip(spec["gpus"], refs, strict=True):
        gpu["scaleTargetRef"] = ref
    return spec


def test_two_gpu_types_may_not_scale_the_same_target() -> None:
    spec = with_targets(
        target("gpu-a10g"), target("gpu-l4"), target("gpu-a10g", "cluster.x-k8s.io/v1")
    )
    assert errors_of(spec) == [
        "spec.gpus[2].scaleTargetRef: names the same target as spec.gpus[0] "
        "(MachineDeployment/gpu-a10g)"
    ]


def test_targets_differ_by_group_kind_or_name() -> None:
    other_group = with_targets(target("x"), target("x", "infra.example.com/v1"), target("y"))
    core_and_apps = with_targets(target("x", "v1"), target("x", "apps/v1"), target("y"))
    groups = [
        [g.scale_target_ref.group for g in api.validate_spec(spec).gpus if g.scale_target_ref]
        for spec in (other_group, core_and_apps)
    ]
    assert groups == [
        ["cluster.x-k8s.io", "infra.example.com", "cluster.x-k8s.io"],
        ["", "apps", "cluster.x-k8s.io"],
    ]
    assert errors_of(with_targets(target("x", "v1"), target("x", "v1"), target("y"))) == [
        "spec.gpus[1].scaleTargetRef: names the same target as spec.gpus[0] (MachineDeployment/x)"
    ]


def test_policy_defaults_to_enforce() -> None:
    spec = mutate("gpus.1.policy", "Observe")
    parsed = api.validate_spec(spec)
    assert [g.policy for g in parsed.gpus] == ["Enforce", "Observe"]
    assert errors_of(mutate("gpus.0.policy", "observe")) == [
        "spec.gpus[0].policy: must be one of 'Enforce' or 'Observe', got 'observe'"
    ]


def rate_source(**prometheus: Any) -> dict[str, Any]:
    return {"prometheus": {"url": "http://prom:9090", **prometheus}}


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            "gpus.0.name",
            "H100 SXM",
            "spec.gpus[0].name: must match ^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$, got 'H100 SXM'",
        ),
        ("gpus.0.name", "g" * 64, "spec.gpus[0].name: must be at most 63 characters, got 64"),
        (
            "gpus",
            [{**valid_spec()["gpus"][0], "name": f"G{k}"} for k in range(17)],
            "spec.gpus: must have at most 16 items, got 17",
        ),
        (
            "buckets.outputTokens",
            [1, 100, 20_000_000],
            "spec.buckets.outputTokens[2]: must be <= 10000000, got 20000000",
        ),
        ("gpus.0.maxReplicas", 10_001, "spec.gpus[0].maxReplicas: must be <= 10000, got 10001"),
        ("gpus.0.minReplicas", 10_001, "spec.gpus[0].minReplicas: must be <= 10000, got 10001"),
        (
            "gpus.0.scaleTargetRef",
            target("n" * 300),
            "spec.gpus[0].scaleTargetRef.name: must be at most 253 characters, got 300",
        ),
        (
            "gpus.0.scaleTargetRef",
            {**target("x"), "kind": ""},
            "spec.gpus[0].scaleTargetRef.kind: must not be empty",
        ),
        (
            "gpus.0.replicasPath",
            "/" + "s" * 256,
            "spec.gpus[0].replicasPath: must be at most 256 characters, got 257",
        ),
        (
            "rateSource",
            rate_source(query=""),
            "spec.rateSource.prometheus.query: must not be empty",
        ),
        (
            "rateSource",
            rate_source(url="http://" + "p" * 2042, query="up"),
            "spec.rateSource.prometheus.url: must be at most 2048 characters, got 2049",
        ),
        (
            "rateSource",
            rate_source(query="up", bearerTokenSecretRef={"name": "s", "key": "k" * 254}),
            "spec.rateSource.prometheus.bearerTokenSecretRef.key: must be at most 253 characters, got 254",
        ),
        (
            "rateSource",
            rate_source(),
            "spec.rateSource.prometheus: set exactly one of query and modelName",
        ),
        (
            "rateSource",
            rate_source(query="up", modelName="m"),
            "spec.rateSource.prometheus: set exactly one of query and modelName",
        ),
        (
            "rateSource",
            rate_source(query="up", rangeSeconds=60),
            "spec.rateSource.prometheus.rangeSeconds: applies to the default query, which needs modelName",
        ),
        (
            "workload.fromPrometheus",
            {"modelName": "m"},
            "spec.workload.fromPrometheus: needs spec.rateSource (its Prometheus, credentials and interval are used)",
        ),
        ("dryRun", "true", "spec.dryRun: must be true or false, got 'true'"),
        ("workload.totalRate", "4", "spec.workload.totalRate: must be a number, got '4'"),
        ("sliceFactor", True, "spec.sliceFactor: must be an integer, got true"),
        ("gpus.0.name", 7, "spec.gpus[0].name: must be a string, got 7"),
    ],
)
def test_the_crd_bounds_and_rules(path: str, value: Any, message: str) -> None:
    assert errors_of(mutate(path, value)) == [message]


def test_following_the_distribution_needs_a_model_name() -> None:
    spec = mutate("rateSource", rate_source(query="up"))
    spec["workload"]["fromPrometheus"] = {}
    assert errors_of(spec) == [
        "spec.workload.fromPrometheus.modelName: is required when spec.rateSource.prometheus has "
        "no modelName (the token histograms are selected by vLLM's model_name label)"
    ]
    spec["rateSource"] = rate_source(modelName="llama")
    assert api.validate_spec(spec).workload.from_prometheus is not None


def test_values_are_read_as_json() -> None:
    """As the API server reads them: null is absent (defaults apply), 8.0 is the integer 8."""
    spec = mutate("sliceFactor", None)
    spec["gpus"][0]["maxReplicas"] = None
    spec["buckets"]["inputTokens"] = [1.0, 100.0, 1000]
    parsed = api.validate_spec(spec)
    assert parsed.slice_factor == 8
    assert parsed.gpus[0].max_replicas is None
    assert parsed.buckets.input_tokens == [1, 100, 1000]
    assert errors_of(mutate("workload.totalRate", None)) == ["spec.workload.totalRate: is required"]
    assert errors_of(mutate("sliceFactor", 8.5)) == [
        "spec.sliceFactor: must be an integer, got 8.5"
    ]


def test_bounds_are_inclusive_where_the_crd_says() -> None:
    spec = valid_spec()
    spec["buckets"]["inputTokens"] = [1, 100, 10_000_000]
    spec["gpus"][0].update(minReplicas=10_000, maxReplicas=10_000, name="H100-SXM_80GB.v2")
    spec["gpus"][0]["scaleTargetRef"] = target("n" * 253)
    assert api.validate_spec(spec).gpus[0].max_replicas == 10_000


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            "buckets.inputTokens",
            list(range(1, 41)),
            "spec.buckets.inputTokens: must have at most 33 items, got 40",
        ),
        (
            "workload.distribution",
            [],
            "spec.workload.distribution: must have at least 1 items, got 0",
        ),
    ],
)
def test_list_bounds_come_before_the_shapes_they_break(path: str, value: Any, message: str) -> None:
    errors = errors_of(mutate(path, value))
    assert errors[0] == message
    assert all("rows (one per input bucket)" in e for e in errors[1:])
