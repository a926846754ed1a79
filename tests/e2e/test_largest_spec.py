"""The largest allocation the CRD admits, end to end: 32 x 32 buckets, 16 GPU types, every number
written at full precision (17 significant digits), the largest slice factor. The API server takes
it, the operator solves it, writes its whole status (the per-bucket routing table included) and
brings the 16 Deployments to the plan; and nothing stores a copy of the spec in an annotation."""

from __future__ import annotations

import functools
import json
import random
from typing import Any

import pytest
from kubernetes.dynamic.exceptions import DynamicApiError

from melange import api
from melange.plan import solver

from .kube import Kinds, Kube, eventually
from .operator_process import OperatorProcess

pytestmark = pytest.mark.e2e

NAME = "largest"
PATH = "/apis/melange.dev/v1alpha1/namespaces/{namespace}/melangeallocations"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
SOLVE_SECONDS = 120  # the operator's solve of this spec, with room for 2 busy cores


def largest_spec(seed: int = 7) -> dict[str, Any]:
    rng = random.Random(seed)

    def full() -> float:  # e.g. 37.96218456107442: no number rounds to fewer digits
        return rng.uniform(0.1, 100.0) + 0.123456789012345678

    edges = [1 + 300 * k for k in range(api.MAX_EDGES)]
    size = api.MAX_BUCKETS
    gpus = []
    for k in range(api.MAX_GPUS):
        speed = rng.uniform(0.05, 0.5)
        gpus.append(
            {
                "name": f"gpu-{k:02d}",
                "costPerHour": round(rng.uniform(0.5, 8.0), 2) + 0.123456789012345678,
                "throughput": [[speed * full() for _ in range(size)] for _ in range(size)],
                "minReplicas": 0,
                "maxReplicas": api.MAX_REPLICAS,
                "scaleTargetRef": {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "name": f"pool-{k:02d}",
                },
            }
        )
    return {
        "buckets": {"inputTokens": edges, "outputTokens": edges},
        "workload": {
            "distribution": [[full() for _ in range(size)] for _ in range(size)],
            "totalRate": 2000.123456789012345678,
        },
        "sliceFactor": api.MAX_SLICE_FACTOR,
        "headroom": 0.123456789012345678,
        "gpus": gpus,
    }


def test_the_largest_spec_reconciles_and_gets_its_status(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    spec = largest_spec()
    assert len(json.dumps(spec)) > 300_000  # full precision: about 340 KB of JSON
    expected = solver.solve_spec(api.validate_resource_spec(spec))
    assert expected.solved, expected.reason
    for gpu in spec["gpus"]:
        kube.deployment(gpu["scaleTargetRef"]["name"], namespace, 0)
    kube.create(
        {
            "apiVersion": f"{api.API_GROUP}/{api.API_VERSION}",
            "kind": api.KIND,
            "metadata": {"name": NAME},
            "spec": spec,
        },
        namespace,
    )

    ready = kube.wait_condition(NAME, namespace, "Ready", timeout=SOLVE_SECONDS)
    assert ready["reason"] == "Reconciled", ready
    allocation = kube.allocation(NAME, namespace)
    status = allocation["status"]
    assert status["observedGeneration"] == allocation["metadata"]["generation"]
    assert status["planStatus"] in {"Optimal", "Feasible"}
    planned = {g["name"]: g["replicas"] for g in status["gpus"]}
    assert list(planned) == [g["name"] for g in spec["gpus"]]
    assert status["totalReplicas"] == sum(planned.values()) > 0
    assert status["gpuTypes"] == sum(1 for r in planned.values() if r > 0)
    assert status["costPerHour"] == pytest.approx(expected.cost_per_hour, rel=1e-6)
    assert status["solvedRate"] == pytest.approx(spec["workload"]["totalRate"], rel=1e-6)
    # every bucket has traffic: the routing table lists all 1,024, each bucket's slices complete
    assert len(status["routing"]) == api.MAX_BUCKETS**2
    for bucket in status["routing"]:
        assert sum(s["slices"] for s in bucket["shares"]) == api.MAX_SLICE_FACTOR
    assert len(json.dumps(status)) < 200_000  # about 150 KB, nearly all of it the routing table
    assert "routingOmitted" not in status
    # the pools are at the plan
    for gpu in spec["gpus"]:
        pool = gpu["scaleTargetRef"]["name"]
        eventually(functools.partial(_equal, kube, namespace, pool, planned[gpu["name"]]))
    # no copy of the spec in an annotation (Kopf's last-handled-configuration, kubectl's)
    annotations = allocation["metadata"].get("annotations") or {}
    assert not any(len(value) > 1024 for value in annotations.values()), list(annotations)
    assert not any("kopf" in key for key in annotations), list(annotations)


def test_client_side_apply_cannot_keep_a_copy_of_it(kube: Kube, namespace: str) -> None:
    """`kubectl apply` (client side) would store the whole manifest in an annotation: the API
    server refuses that much (256 KiB for all annotations), so such a spec is created with
    `kubectl create` or `kubectl apply --server-side`. At 6 significant digits it fits."""
    manifest = {
        "apiVersion": f"{api.API_GROUP}/{api.API_VERSION}",
        "kind": api.KIND,
        "metadata": {"name": NAME},
        "spec": largest_spec(),
    }

    def with_copy(document: dict[str, Any]) -> dict[str, Any]:
        copied = json.dumps(document)
        metadata = {**document["metadata"], "annotations": {LAST_APPLIED: copied}}
        return {**document, "metadata": metadata}

    with pytest.raises(DynamicApiError) as refused:
        kube.dynamic.request(
            "post",
            PATH.format(namespace=namespace),
            body=with_copy(manifest),
            query_params=[("dryRun", "All")],
        )
    assert "metadata.annotations" in str(refused.value.body), refused.value.body
    shorter = _digits(manifest, 6)
    assert len(json.dumps(shorter)) < 200_000
    kube.dynamic.request(
        "post",
        PATH.format(namespace=namespace),
        body=with_copy(shorter),
        query_params=[("dryRun", "All")],
    )


def _digits(value: Any, digits: int) -> Any:
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, list):
        return [_digits(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: _digits(v, digits) for k, v in value.items()}
    return value


def _equal(kube: Kube, namespace: str, pool: str, replicas: int) -> None:
    assert kube.replicas(Kinds.deployment, pool, namespace) == replicas, pool
