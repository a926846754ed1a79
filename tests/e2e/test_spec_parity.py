"""One spec, two validators: the CRD (schema + CEL, on a real API server) and the model
(`api.validate_spec`, what `melange solve` and the operator run) must give the same verdict.

Each rule and bound has a named case just inside and just outside it; generated mutations of a
valid spec near the bounds cover the combinations. The API server gets every spec as a
server-side dry run (`dryRun=All`) with `fieldValidation=Strict`, as `kubectl apply` sends it.

Specs are encoded as kubectl encodes YAML: an integral number is written without a fraction
(`8.0` becomes `8`). The API server's CEL rules fail on a JSON `8.0` in an integer field that
kubectl never sends; the model reads 8.0 as the integer 8, as the schema does.
"""

from __future__ import annotations

import contextlib
import copy
import json
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes.dynamic.exceptions import DynamicApiError

from melange import api
from tests.e2e.kube import Kube
from tests.specs import with_value

pytestmark = pytest.mark.e2e

Spec = dict[str, Any]
PATH = "/apis/melange.dev/v1alpha1/namespaces/{namespace}/melangeallocations"


def gpu(name: str, target: str, api_version: str = "cluster.x-k8s.io/v1beta1") -> Spec:
    return {
        "name": name,
        "costPerHour": 1.01,
        "throughput": [[20, 6], [8, 2]],
        "minReplicas": 0,
        "maxReplicas": 20,
        "scaleTargetRef": {"apiVersion": api_version, "kind": "MachineDeployment", "name": target},
    }


def base() -> Spec:
    """A valid spec that uses every section, so each rule has something to act on."""
    return {
        "buckets": {"inputTokens": [1, 100, 1000], "outputTokens": [1, 100, 1000]},
        "workload": {
            "distribution": [[3, 1], [1, 1]],
            "totalRate": 4.0,
            "fromPrometheus": {"windowSeconds": 3600, "driftTolerance": 0.1, "minRequests": 100},
        },
        "sliceFactor": 8,
        "headroom": 0.1,
        "dryRun": True,
        "gpus": [gpu("L4", "gpu-l4"), gpu("A10G", "gpu-a10g")],
        "rateSource": {
            "prometheus": {
                "url": "http://prometheus.monitoring:9090",
                "modelName": "llama",
                "rangeSeconds": 120,
                "bearerTokenSecretRef": {"name": "prom", "key": "token"},
                "caConfigMapRef": {"name": "prom-ca", "key": "ca.crt"},
            },
            "intervalSeconds": 30,
            "driftTolerance": 0.1,
            "scaleDownStabilizationSeconds": 300,
        },
    }


def kubectl_json(value: Any) -> Any:
    """The value as kubectl sends it: integral floats without a fraction."""
    if isinstance(value, dict):
        return {k: kubectl_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [kubectl_json(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# -- the two verdicts ------------------------------------------------------------------------------


def model_verdict(spec: Spec) -> str | None:
    """None when the model accepts the spec, else its errors."""
    try:
        api.validate_spec(copy.deepcopy(spec))
    except api.SpecError as exc:
        return str(exc)
    return None


def server_verdict(kube: Kube, namespace: str, spec: Spec) -> str | None:
    """None when the API server would create the allocation, else its message."""
    body = {
        "apiVersion": f"{api.API_GROUP}/{api.API_VERSION}",
        "kind": api.KIND,
        "metadata": {"name": f"p-{uuid.uuid4().hex[:8]}"},
        "spec": spec,
    }
    try:
        kube.dynamic.request(
            "post",
            PATH.format(namespace=namespace),
            body=body,
            query_params=[("dryRun", "All"), ("fieldValidation", "Strict")],
        )
    except DynamicApiError as exc:
        if exc.status not in (400, 422):
            raise
        return str(json.loads(exc.body or "{}").get("message"))
    return None


def server_verdicts(kube: Kube, namespace: str, specs: Iterable[Spec]) -> list[str | None]:
    """Dry runs in parallel: each is a round trip, and there are a few hundred."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda s: server_verdict(kube, namespace, s), specs))


def assert_same_verdicts(specs: list[Spec], server: list[str | None]) -> None:
    for spec, verdict in zip(specs, server, strict=True):
        model = model_verdict(spec)
        assert (model is None) == (verdict is None), (
            f"model: {model or 'accepted'}\nAPI server: {verdict or 'accepted'}\n"
            f"spec: {json.dumps(spec)}"
        )


@pytest.fixture(scope="module")
def parity_namespace(kube: Kube) -> str:
    name = f"parity-{uuid.uuid4().hex[:8]}"
    kube.create_namespace(name)
    return name


# -- one named case per rule, just inside and just outside ----------------------------------------


@dataclass(frozen=True)
class Case:
    rule: str
    change: Callable[[Spec], Spec]
    accepted: bool


def at(path: str, value: Any) -> Callable[[Spec], Spec]:
    return lambda spec: with_value(spec, path, value)


def without(path: str) -> Callable[[Spec], Spec]:
    def change(spec: Spec) -> Spec:
        result = copy.deepcopy(spec)
        node: Any = result
        *parents, last = path.split(".")
        for part in parents:
            node = node[int(part) if part.isdigit() else part]
        del node[last]
        return result

    return change


def then(*changes: Callable[[Spec], Spec]) -> Callable[[Spec], Spec]:
    def change(spec: Spec) -> Spec:
        for step in changes:
            spec = step(spec)
        return spec

    return change


def shaped(
    n_in: int, n_out: int, edge: Callable[[int], int] = lambda k: k + 1
) -> Callable[[Spec], Spec]:
    """Buckets with that many edges (1, 2, 3, ...), and every matrix reshaped to match."""

    def change(spec: Spec) -> Spec:
        result = copy.deepcopy(spec)
        result["buckets"] = {
            "inputTokens": [edge(k) for k in range(n_in)],
            "outputTokens": [edge(k) for k in range(n_out)],
        }
        matrix = [[1] * max(n_out - 1, 0) for _ in range(max(n_in - 1, 0))]
        result["workload"]["distribution"] = matrix
        for g in result["gpus"]:
            g["throughput"] = copy.deepcopy(matrix)
        return result

    return change


def gpus(count: int) -> Callable[[Spec], Spec]:
    return at("gpus", [gpu(f"G{k}", f"pool-{k}") for k in range(count)])


def ref(api_version: str, kind: str, name: str) -> dict[str, str]:
    return {"apiVersion": api_version, "kind": kind, "name": name}


P = "rateSource.prometheus"
F = "workload.fromPrometheus"
QUERY = then(without(f"{P}.modelName"), without(f"{P}.rangeSeconds"), at(f"{P}.query", "up"))

REF = {"name": "prices", "key": "h100"}

CASES = [
    Case("valid", lambda s: s, True),
    # buckets
    Case("edges.minItems", shaped(2, 2), True),
    Case("edges.minItems", shaped(1, 3), False),
    Case("edges.maxItems", shaped(33, 33), True),
    Case("edges.maxItems", shaped(34, 3), False),
    Case("edges.maxItems", shaped(3, 40), False),
    Case("edges.minimum", at("buckets.inputTokens", [1, 100, 1000]), True),
    Case("edges.minimum", at("buckets.inputTokens", [0, 100, 1000]), False),
    Case("edges.maximum", at("buckets.outputTokens", [1, 100, 10_000_000]), True),
    Case("edges.maximum", at("buckets.outputTokens", [1, 100, 10_000_001]), False),
    Case("edges.maximum", at("buckets.outputTokens", [1, 100, 20_000_000]), False),
    Case("edges.increasing", at("buckets.inputTokens", [1, 100, 100]), False),
    Case("edges.increasing", at("buckets.inputTokens", [1, 1000, 100]), False),
    Case("edges.integer", at("buckets.inputTokens", [1, 100.5, 1000]), False),
    Case("edges.required", without("buckets.outputTokens"), False),
    # workload
    Case("distribution.rows", at("workload.distribution", [[3, 1]]), False),
    Case("distribution.columns", at("workload.distribution", [[3, 1], [1]]), False),
    Case("distribution.minimum", at("workload.distribution.1.1", 0), True),
    Case("distribution.minimum", at("workload.distribution.1.1", -0.5), False),
    Case("distribution.minimum", at("workload.distribution.1.1", 5e-324), True),
    Case("distribution.maximum", at("workload.distribution.1.1", 1e12), True),
    Case("distribution.maximum", at("workload.distribution.1.1", 1.000001e12), False),
    Case("distribution.maximum", at("workload.distribution.1.1", 1e307), False),
    Case("distribution.number", at("workload.distribution.1.1", "1"), False),
    Case("distribution.null", at("workload.distribution.1.1", None), False),
    Case("distribution.positiveSum", at("workload.distribution", [[0, 0], [0, 0.001]]), True),
    Case("distribution.positiveSum", at("workload.distribution", [[0, 0], [0, 0]]), False),
    Case(
        "distribution.positiveSum",
        then(at("workload.distribution", [[0, 0], [0, 0]]), at("workload.totalRate", 0)),
        True,
    ),
    Case("totalRate.minimum", at("workload.totalRate", 0), True),
    Case("totalRate.minimum", at("workload.totalRate", -0.001), False),
    Case("totalRate.positiveMinimum", at("workload.totalRate", 1e-6), True),
    Case("totalRate.positiveMinimum", at("workload.totalRate", 9.99e-7), False),
    Case("totalRate.positiveMinimum", at("workload.totalRate", 5e-324), False),
    Case("totalRate.maximum", at("workload.totalRate", 1e9), True),
    Case("totalRate.maximum", at("workload.totalRate", 1.000001e9), False),
    Case("totalRate.maximum", at("workload.totalRate", 1e308), False),
    Case("totalRate.number", at("workload.totalRate", "4"), False),
    Case("totalRate.required", at("workload.totalRate", None), False),
    Case("fromPrometheus.windowSeconds", at(f"{F}.windowSeconds", 10), True),
    Case("fromPrometheus.windowSeconds", at(f"{F}.windowSeconds", 9), False),
    Case("fromPrometheus.windowSeconds", at(f"{F}.windowSeconds", 604800), True),
    Case("fromPrometheus.windowSeconds", at(f"{F}.windowSeconds", 604801), False),
    Case("fromPrometheus.driftTolerance", at(f"{F}.driftTolerance", 1), True),
    Case("fromPrometheus.driftTolerance", at(f"{F}.driftTolerance", 1.001), False),
    Case("fromPrometheus.driftTolerance", at(f"{F}.driftTolerance", 1e-9), True),
    Case("fromPrometheus.driftTolerance", at(f"{F}.driftTolerance", 0), False),
    Case("fromPrometheus.minRequests", at(f"{F}.minRequests", 0), True),
    Case("fromPrometheus.minRequests", at(f"{F}.minRequests", -1), False),
    Case("fromPrometheus.minRequests", at(f"{F}.minRequests", 1e12), True),
    Case("fromPrometheus.minRequests", at(f"{F}.minRequests", 1.000001e12), False),
    Case("fromPrometheus.modelName", at(f"{F}.modelName", "m" * 253), True),
    Case("fromPrometheus.modelName", at(f"{F}.modelName", "m" * 254), False),
    Case("fromPrometheus.modelName", at(f"{F}.modelName", ""), False),
    Case("fromPrometheus.needsRateSource", without("rateSource"), False),
    Case("fromPrometheus.needsRateSource", then(without("rateSource"), without(F)), True),
    Case("fromPrometheus.needsModelName", QUERY, False),
    Case("fromPrometheus.needsModelName", then(QUERY, at(f"{F}.modelName", "llama")), True),
    # top level
    Case("sliceFactor.minimum", at("sliceFactor", 1), True),
    Case("sliceFactor.minimum", at("sliceFactor", 0), False),
    Case("sliceFactor.maximum", at("sliceFactor", 1024), True),
    Case("sliceFactor.maximum", at("sliceFactor", 1025), False),
    Case("sliceFactor.integer", at("sliceFactor", 8.5), False),
    Case("sliceFactor.integer", at("sliceFactor", True), False),
    Case("sliceFactor.null", at("sliceFactor", None), True),
    Case("headroom.minimum", at("headroom", 0), True),
    Case("headroom.minimum", at("headroom", -0.01), False),
    Case("headroom.maximum", at("headroom", 10), True),
    Case("headroom.maximum", at("headroom", 10.01), False),
    Case("dryRun.boolean", at("dryRun", False), True),
    Case("dryRun.boolean", at("dryRun", "true"), False),
    Case("dryRun.boolean", at("dryRun", 1), False),
    Case("unknownField", at("slicefactor", 8), False),
    Case("unknownField", at("gpus.0.replicas", 2), False),
    # gpus
    Case("gpus.minItems", gpus(1), True),
    Case("gpus.minItems", gpus(0), False),
    Case("gpus.maxItems", gpus(16), True),
    Case("gpus.maxItems", gpus(17), False),
    Case("gpus.name.unique", at("gpus.1.name", "L4"), False),
    Case("gpus.name.pattern", at("gpus.0.name", "H100-SXM_80GB.v2"), True),
    Case("gpus.name.pattern", at("gpus.0.name", "a"), True),
    Case("gpus.name.pattern", at("gpus.0.name", "H100 SXM"), False),
    Case("gpus.name.pattern", at("gpus.0.name", "-a"), False),
    Case("gpus.name.pattern", at("gpus.0.name", "a."), False),
    Case("gpus.name.pattern", at("gpus.0.name", "L4\n"), False),
    Case("gpus.name.pattern", at("gpus.0.name", "Ä4"), False),
    Case("gpus.name.maxLength", at("gpus.0.name", "g" * 63), True),
    Case("gpus.name.maxLength", at("gpus.0.name", "g" * 64), False),
    Case("gpus.name.required", without("gpus.0.name"), False),
    Case("gpus.costPerHour.exclusiveMinimum", at("gpus.0.costPerHour", 1e-9), True),
    Case("gpus.costPerHour.exclusiveMinimum", at("gpus.0.costPerHour", 0), False),
    Case("gpus.costPerHour.maximum", at("gpus.0.costPerHour", 1e9), True),
    Case("gpus.costPerHour.maximum", at("gpus.0.costPerHour", 1.000001e9), False),
    Case("gpus.costPerHour.maximum", at("gpus.0.costPerHour", 1e308), False),
    Case("gpus.throughput.rows", at("gpus.1.throughput", [[1, 1], [1, 1], [1, 1]]), False),
    Case("gpus.throughput.columns", at("gpus.1.throughput", [[1, 1], [1, 1, 1]]), False),
    Case("gpus.throughput.minimum", at("gpus.1.throughput.0.0", 0), True),
    Case("gpus.throughput.minimum", at("gpus.1.throughput.0.0", -1), False),
    Case("gpus.throughput.minimum", at("gpus.1.throughput.0.0", 5e-324), True),
    Case("gpus.throughput.maximum", at("gpus.1.throughput.0.0", 1e9), True),
    Case("gpus.throughput.maximum", at("gpus.1.throughput.0.0", 1.000001e9), False),
    Case("gpus.throughput.maximum", at("gpus.1.throughput.0.0", 1e308), False),
    Case("gpus.minReplicas.minimum", at("gpus.0.minReplicas", -1), False),
    Case(
        "gpus.minReplicas.maximum",
        then(without("gpus.0.maxReplicas"), at("gpus.0.minReplicas", 10000)),
        True,
    ),
    Case(
        "gpus.minReplicas.maximum",
        then(without("gpus.0.maxReplicas"), at("gpus.0.minReplicas", 10001)),
        False,
    ),
    Case("gpus.maxReplicas.minimum", then(at("gpus.0.maxReplicas", 0)), True),
    Case("gpus.maxReplicas.minimum", at("gpus.0.maxReplicas", -1), False),
    Case("gpus.maxReplicas.maximum", at("gpus.0.maxReplicas", 10000), True),
    Case("gpus.maxReplicas.maximum", at("gpus.0.maxReplicas", 10001), False),
    Case("gpus.maxReplicas.null", at("gpus.0.maxReplicas", None), True),
    Case("gpus.minLeMax", then(at("gpus.0.minReplicas", 20)), True),
    Case("gpus.minLeMax", then(at("gpus.0.minReplicas", 21)), False),
    Case("gpus.minLeMax", then(at("gpus.0.maxReplicas", 0), at("gpus.0.minReplicas", 1)), False),
    Case("gpus.scaleTargetRef.apiVersion", at("gpus.0.scaleTargetRef.apiVersion", "a" * 253), True),
    Case(
        "gpus.scaleTargetRef.apiVersion", at("gpus.0.scaleTargetRef.apiVersion", "a" * 254), False
    ),
    Case("gpus.scaleTargetRef.apiVersion", at("gpus.0.scaleTargetRef.apiVersion", ""), False),
    Case("gpus.scaleTargetRef.kind", at("gpus.0.scaleTargetRef.kind", "K" * 63), True),
    Case("gpus.scaleTargetRef.kind", at("gpus.0.scaleTargetRef.kind", "K" * 64), False),
    Case("gpus.scaleTargetRef.kind", without("gpus.0.scaleTargetRef.kind"), False),
    Case("gpus.scaleTargetRef.name", at("gpus.0.scaleTargetRef.name", "n" * 253), True),
    Case("gpus.scaleTargetRef.name", at("gpus.0.scaleTargetRef.name", "n" * 254), False),
    Case("gpus.scaleTargetRef.name", at("gpus.0.scaleTargetRef.name", "n" * 300), False),
    Case("gpus.scaleTargetRef.name", at("gpus.0.scaleTargetRef.name", ""), False),
    Case("gpus.replicasPath.pattern", at("gpus.0.replicasPath", "/spec/size"), True),
    Case("gpus.replicasPath.pattern", at("gpus.0.replicasPath", "spec/size"), False),
    Case("gpus.replicasPath.pattern", at("gpus.0.replicasPath", "/spec//size"), False),
    Case("gpus.replicasPath.maxLength", at("gpus.0.replicasPath", "/" + "s" * 255), True),
    Case("gpus.replicasPath.maxLength", at("gpus.0.replicasPath", "/" + "s" * 256), False),
    Case("gpus.policy.enum", at("gpus.0.policy", "Enforce"), True),
    Case("gpus.policy.enum", at("gpus.0.policy", "Observe"), True),
    Case("gpus.policy.enum", at("gpus.0.policy", "enforce"), False),
    Case("gpus.policy.enum", at("gpus.0.policy", ""), False),
    Case("gpus.readyReplicasPath", at("gpus.0.readyReplicasPath", "/status/readyReplicas"), True),
    Case("gpus.readyReplicasPath", at("gpus.0.readyReplicasPath", "status/ready"), False),
    Case("gpus.maxScaleUpPerInterval", at("gpus.0.maxScaleUpPerInterval", 1), True),
    Case("gpus.maxScaleUpPerInterval", at("gpus.0.maxScaleUpPerInterval", 0), False),
    Case("gpus.maxScaleDownPerInterval", at("gpus.0.maxScaleDownPerInterval", 10000), True),
    Case("gpus.maxScaleDownPerInterval", at("gpus.0.maxScaleDownPerInterval", 10001), False),
    Case("transition", at("transition", {}), True),
    Case("transition.readyTimeoutSeconds", at("transition", {"readyTimeoutSeconds": 0}), True),
    Case("transition.readyTimeoutSeconds", at("transition", {"readyTimeoutSeconds": -1}), False),
    Case(
        "transition.capacityTimeoutSeconds", at("transition", {"capacityTimeoutSeconds": 0}), False
    ),
    Case(
        "transition.capacityRetrySeconds", at("transition", {"capacityRetrySeconds": 604800}), True
    ),
    Case(
        "transition.capacityRetrySeconds", at("transition", {"capacityRetrySeconds": 604801}), False
    ),
    Case("minSavings", at("minSavings", 0), True),
    Case("minSavings", at("minSavings", 1), True),
    Case("minSavings", at("minSavings", 1.5), False),
    Case("gpus.priority", at("gpus.0.priority", 1000), True),
    Case("gpus.priority", at("gpus.0.priority", 1001), False),
    Case("gpus.priority", at("gpus.0.priority", -1), False),
    Case("priceTolerance", at("priceTolerance", 10), True),
    Case("priceTolerance", at("priceTolerance", -0.1), False),
    Case("costPerHourFrom", at("gpus.0.costPerHourFrom", {"prometheusQuery": "spot"}), True),
    Case(
        "costPerHourFrom",
        then(
            without("workload.fromPrometheus"),
            without("rateSource"),
            at("gpus.0.costPerHourFrom", {"prometheusQuery": "spot"}),
        ),
        False,
    ),
    Case(
        "costPerHourFrom",
        then(
            without("workload.fromPrometheus"),
            without("rateSource"),
            at("gpus.0.costPerHourFrom", {"configMapKeyRef": REF}),
        ),
        True,
    ),
    Case("costPerHourFrom", at("gpus.0.costPerHourFrom", {}), False),
    *(
        Case("gpus.upstream.port", at("gpus.0.upstream", {"service": "llama", "port": port}), ok)
        for port, ok in (
            (1, True),
            (65535, True),
            (0, False),
            (65536, False),
            ("http", True),
            ("a" * 15, True),
            ("a" * 16, False),
            ("HTTP", False),
            ("8080", False),
            ("-http", False),
            ("", False),
            (True, False),
        )
    ),
    *(
        Case("gpus.upstream.service", at("gpus.0.upstream", {"service": service, "port": 80}), ok)
        for service, ok in (("llama-8b", True), ("Llama", False), ("8b", False), ("a" * 64, False))
    ),
    Case("gpus.upstream", at("gpus.0.upstream", {"service": "llama"}), False),
    Case("routing.publishConfigMap", at("routing", {"publishConfigMap": True}), True),
    Case("routing.publishConfigMap", at("routing", {"publishConfigMap": "yes"}), False),
    Case("routing", at("routing", {"configMap": True}), False),
    Case(
        "costPerHourFrom",
        at("gpus.0.costPerHourFrom", {"configMapKeyRef": REF, "prometheusQuery": "spot"}),
        False,
    ),
    Case(
        "gpus.scaleTargetRef.unique",
        at("gpus.1.scaleTargetRef", ref("cluster.x-k8s.io/v1beta1", "MachineDeployment", "gpu-l4")),
        False,
    ),
    Case(
        "gpus.scaleTargetRef.unique",
        at("gpus.1.scaleTargetRef", ref("cluster.x-k8s.io/v1", "MachineDeployment", "gpu-l4")),
        False,
    ),
    Case(
        "gpus.scaleTargetRef.unique",
        at("gpus.1.scaleTargetRef", ref("other.x-k8s.io/v1beta1", "MachineDeployment", "gpu-l4")),
        True,
    ),
    Case(
        "gpus.scaleTargetRef.unique",
        at("gpus.1.scaleTargetRef", ref("cluster.x-k8s.io/v1beta1", "MachinePool", "gpu-l4")),
        True,
    ),
    Case(
        "gpus.scaleTargetRef.unique",
        then(
            at("gpus.0.scaleTargetRef", ref("v1", "ReplicationController", "pool")),
            at("gpus.1.scaleTargetRef", ref("v1", "ReplicationController", "pool")),
        ),
        False,
    ),
    Case(
        "gpus.scaleTargetRef.unique",
        then(
            at("gpus.0.scaleTargetRef", ref("v1", "Deployment", "pool")),
            at("gpus.1.scaleTargetRef", ref("apps/v1", "Deployment", "pool")),
        ),
        True,
    ),
    # rateSource
    Case("rateSource.prometheus.required", without(P), False),
    Case("rateSource.prometheus.url.pattern", at(f"{P}.url", "https://p"), True),
    Case("rateSource.prometheus.url.pattern", at(f"{P}.url", "prometheus:9090"), False),
    Case("rateSource.prometheus.url.pattern", at(f"{P}.url", "http://p.m.svc:9090/a/b/"), True),
    Case("rateSource.prometheus.url.pattern", at(f"{P}.url", "http://127.0.0.1:1/admin#"), False),
    Case("rateSource.prometheus.url.pattern", at(f"{P}.url", "http://p/admin?x="), False),
    Case("rateSource.prometheus.url.pattern", at(f"{P}.url", "http://p?x=1"), False),
    Case("rateSource.prometheus.url.pattern", at(f"{P}.url", "http://user:pw@p"), False),
    Case("rateSource.prometheus.url.pattern", at(f"{P}.url", "http://p\\@q"), False),
    Case("rateSource.prometheus.url.pattern", at(f"{P}.url", "http://p/a b"), False),
    Case("rateSource.prometheus.url.pattern", at(f"{P}.url", "file:///etc/passwd"), False),
    Case("rateSource.prometheus.url.pattern", at(f"{P}.url", "http://"), False),
    Case("rateSource.prometheus.url.maxLength", at(f"{P}.url", "http://" + "p" * 2041), True),
    Case("rateSource.prometheus.url.maxLength", at(f"{P}.url", "http://" + "p" * 2042), False),
    Case("rateSource.prometheus.url.required", without(f"{P}.url"), False),
    Case(
        "rateSource.prometheus.query.minLength",
        then(QUERY, at(f"{F}.modelName", "m"), at(f"{P}.query", "")),
        False,
    ),
    Case(
        "rateSource.prometheus.query.maxLength",
        then(QUERY, at(f"{F}.modelName", "m"), at(f"{P}.query", "q" * 4096)),
        True,
    ),
    Case(
        "rateSource.prometheus.query.maxLength",
        then(QUERY, at(f"{F}.modelName", "m"), at(f"{P}.query", "q" * 4097)),
        False,
    ),
    Case("rateSource.prometheus.queryXorModelName", at(f"{P}.query", "up"), False),
    Case(
        "rateSource.prometheus.queryXorModelName",
        then(without(F), without(f"{P}.rangeSeconds"), without(f"{P}.modelName")),
        False,
    ),
    Case(
        "rateSource.prometheus.rangeSecondsNeedsModelName",
        then(QUERY, at(f"{F}.modelName", "m"), at(f"{P}.rangeSeconds", 60)),
        False,
    ),
    Case("rateSource.prometheus.modelName", at(f"{P}.modelName", "m" * 253), True),
    Case("rateSource.prometheus.modelName", at(f"{P}.modelName", "m" * 254), False),
    Case("rateSource.prometheus.rangeSeconds", at(f"{P}.rangeSeconds", 1), True),
    Case("rateSource.prometheus.rangeSeconds", at(f"{P}.rangeSeconds", 0), False),
    Case("rateSource.prometheus.rangeSeconds", at(f"{P}.rangeSeconds", 86400), True),
    Case("rateSource.prometheus.rangeSeconds", at(f"{P}.rangeSeconds", 86401), False),
    Case(
        "rateSource.prometheus.bearerTokenSecretRef",
        at(f"{P}.bearerTokenSecretRef.name", "s" * 253),
        True,
    ),
    Case(
        "rateSource.prometheus.bearerTokenSecretRef",
        at(f"{P}.bearerTokenSecretRef.name", "s" * 254),
        False,
    ),
    Case(
        "rateSource.prometheus.bearerTokenSecretRef", at(f"{P}.bearerTokenSecretRef.key", ""), False
    ),
    Case(
        "rateSource.prometheus.bearerTokenSecretRef",
        without(f"{P}.bearerTokenSecretRef.key"),
        False,
    ),
    Case("rateSource.prometheus.caConfigMapRef", at(f"{P}.caConfigMapRef.key", "k" * 253), True),
    Case("rateSource.prometheus.caConfigMapRef", at(f"{P}.caConfigMapRef.key", "k" * 254), False),
    Case("rateSource.prometheus.caConfigMapRef", without(f"{P}.caConfigMapRef.name"), False),
    Case("rateSource.intervalSeconds", at("rateSource.intervalSeconds", 5), True),
    Case("rateSource.intervalSeconds", at("rateSource.intervalSeconds", 4), False),
    Case("rateSource.intervalSeconds", at("rateSource.intervalSeconds", 3600), True),
    Case("rateSource.intervalSeconds", at("rateSource.intervalSeconds", 3601), False),
    Case("rateSource.driftTolerance", at("rateSource.driftTolerance", 0), True),
    Case("rateSource.driftTolerance", at("rateSource.driftTolerance", -0.1), False),
    Case("rateSource.driftTolerance", at("rateSource.driftTolerance", 10), True),
    Case("rateSource.driftTolerance", at("rateSource.driftTolerance", 10.1), False),
    Case(
        "rateSource.scaleDownStabilizationSeconds",
        at("rateSource.scaleDownStabilizationSeconds", 0),
        True,
    ),
    Case(
        "rateSource.scaleDownStabilizationSeconds",
        at("rateSource.scaleDownStabilizationSeconds", -1),
        False,
    ),
    Case(
        "rateSource.scaleDownStabilizationSeconds",
        at("rateSource.scaleDownStabilizationSeconds", 86400),
        True,
    ),
    Case(
        "rateSource.scaleDownStabilizationSeconds",
        at("rateSource.scaleDownStabilizationSeconds", 86401),
        False,
    ),
    Case("rateSource.null", then(without(F), at("rateSource", None)), True),
]


def case_id(case: Case) -> str:
    return f"{case.rule}-{'inside' if case.accepted else 'outside'}"


CASE_SPECS = [kubectl_json(case.change(base())) for case in CASES]


@pytest.fixture(scope="module")
def named_verdicts(kube: Kube, parity_namespace: str) -> list[str | None]:
    """The API server's verdict on every named case, asked for once and in parallel."""
    return server_verdicts(kube, parity_namespace, CASE_SPECS)


@pytest.mark.parametrize(("index", "case"), list(enumerate(CASES)), ids=[case_id(c) for c in CASES])
def test_named_case(index: int, case: Case, named_verdicts: list[str | None]) -> None:
    spec, server = CASE_SPECS[index], named_verdicts[index]
    model = model_verdict(spec)
    assert (server is None) == case.accepted, f"API server: {server or 'accepted'}"
    assert (model is None) == case.accepted, f"model: {model or 'accepted'}"


# -- where the two differ by design ---------------------------------------------------------------

# Rules the API server cannot check: JSON, its wire format, has no NaN or Infinity, so only YAML
# given to `melange solve` (`.nan`, `.inf`) can carry them; the model rejects them.
MODEL_ONLY = {
    "numbers.finite.nan": at("workload.distribution.0.0", float("nan")),
    "numbers.finite.inf": at("gpus.0.throughput.1.1", float("inf")),
    "numbers.finite.totalRate": at("workload.totalRate", float("inf")),
}


@pytest.mark.parametrize("rule", MODEL_ONLY)
def test_model_only_rules_are_enforced_by_the_model(rule: str) -> None:
    spec = MODEL_ONLY[rule](base())
    with pytest.raises(ValueError, match="JSON compliant"):
        json.dumps(spec, allow_nan=False)  # no JSON document can say this to the API server
    assert model_verdict(spec) is not None


def test_scale_target_is_required_by_the_api_server_only(kube: Kube, parity_namespace: str) -> None:
    """The one rule the model leaves out: `melange solve` plans without node pools (a bare spec
    names none), while the operator needs one per GPU type and the API server requires it."""
    spec = without("gpus.1.scaleTargetRef")(base())
    assert server_verdict(kube, parity_namespace, spec) is not None
    assert model_verdict(spec) is None


# -- generated specs near the bounds --------------------------------------------------------------


def lengths(limit: int) -> st.SearchStrategy[int]:
    return st.sampled_from([0, 1, limit - 1, limit, limit + 1])


def around(*bounds: float) -> st.SearchStrategy[float]:
    near = [b + d for b in bounds for d in (-1, -0.001, 0, 0.001, 1)]
    return st.sampled_from(sorted(set(near)))


TEXT = st.sampled_from(["a", "A", "0", "-", ".", "_", " ", "/", "é", ":"])


def text(limit: int) -> st.SearchStrategy[str]:
    return st.builds(lambda n, c, head: (head + c * n)[: max(n, 0)], lengths(limit), TEXT, TEXT)


FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "sliceFactor": around(1, 1024),
    "headroom": around(0, 10),
    "workload.totalRate": around(0, 1e9),
    "workload.distribution.0.1": around(0, 1e12),
    f"{F}.windowSeconds": around(10, 604800).map(int),
    f"{F}.driftTolerance": around(0, 1),
    f"{F}.minRequests": around(0, 1e12),
    f"{F}.modelName": text(253),
    "gpus.0.name": text(63),
    "gpus.1.name": st.sampled_from(["L4", "A10G", "a10g", "L4.1"]),
    "gpus.0.costPerHour": around(0),
    "gpus.1.throughput.1.0": around(0, 1e9),
    "gpus.0.minReplicas": around(0, 20, 10000).map(int),
    "gpus.0.maxReplicas": around(0, 20, 10000).map(int),
    "gpus.0.replicasPath": st.sampled_from(
        ["/spec/size", "/a", "/", "//a", "a/b", "/spec/" + "s" * 250]
    ),
    "gpus.0.policy": st.sampled_from(["Enforce", "Observe", "Audit"]),
    "gpus.0.maxScaleUpPerInterval": around(1, 10000).map(int),
    "transition": st.fixed_dictionaries(
        {
            "readyTimeoutSeconds": around(0, 86400).map(int),
            "capacityTimeoutSeconds": around(1, 86400).map(int),
        }
    ),
    "minSavings": around(0, 1),
    "gpus.0.scaleTargetRef.apiVersion": st.sampled_from(
        ["v1", "apps/v1", "cluster.x-k8s.io/v1", "cluster.x-k8s.io/v1beta1", "/v1", "a/b/c", ""]
    ),
    "gpus.0.scaleTargetRef.kind": st.sampled_from(["MachineDeployment", "Deployment", ""]),
    "gpus.0.scaleTargetRef.name": st.one_of(st.sampled_from(["gpu-a10g", "gpu-l4"]), text(253)),
    f"{P}.url": st.sampled_from(
        ["http://p", "https://p:9090/x", "ftp://p", "p:9090", "http:/p", "http://p/#", "http://p?"]
    ),
    f"{P}.query": text(4096),
    f"{P}.modelName": text(253),
    f"{P}.rangeSeconds": around(1, 86400).map(int),
    f"{P}.bearerTokenSecretRef.key": text(253),
    "rateSource.intervalSeconds": around(5, 3600).map(int),
    "rateSource.driftTolerance": around(0, 10),
    "rateSource.scaleDownStabilizationSeconds": around(0, 86400).map(int),
}

REMOVABLE = [F, "rateSource", f"{P}.modelName", f"{P}.rangeSeconds", "gpus.0.maxReplicas"]


@st.composite
def mutated_specs(draw: st.DrawFn) -> Spec:
    """A valid spec with a few fields moved near (or past) their bounds, a few sections dropped,
    and perhaps other bucket edges or GPU counts."""
    spec = base()
    if draw(st.booleans()):
        spec = shaped(
            draw(st.sampled_from([1, 2, 32, 33, 34])),
            draw(st.sampled_from([2, 3, 33, 34])),
            draw(
                st.sampled_from(
                    [lambda k: k + 1, lambda k: 10_000_000 - 40 + k, lambda k: k * 312_500]
                )
            ),
        )(spec)
    if draw(st.booleans()):
        spec = gpus(draw(st.sampled_from([0, 1, 15, 16, 17])))(spec)
    paths = draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=3, unique=True))
    for path in paths:
        value = draw(FIELDS[path])
        # where the section was reshaped or dropped there is nothing to change
        with contextlib.suppress(KeyError, IndexError, TypeError):
            spec = with_value(spec, path, value)
    for path in draw(st.lists(st.sampled_from(REMOVABLE), max_size=2, unique=True)):
        with contextlib.suppress(KeyError, IndexError, TypeError):
            spec = without(path)(spec)
    return spec


@given(batch=st.lists(mutated_specs(), min_size=20, max_size=20))
@settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
def test_generated_specs_get_the_same_verdict(
    batch: list[Spec], kube: Kube, parity_namespace: str
) -> None:
    specs = [kubectl_json(s) for s in batch]
    assert_same_verdicts(specs, server_verdicts(kube, parity_namespace, specs))
