"""Fuzzed allocations through the API server with the operator running: each is rejected by the API
server with a message naming the field, or accepted and reported by the operator (`Ready=False`, a
Warning Event), and no node pool is touched by any of them. The operator never crashes."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from kubernetes.dynamic.exceptions import DynamicApiError

from melange import api
from tests.e2e.kube import Kinds, Kube, eventually
from tests.e2e.operator_process import OperatorProcess

from .mutations import Fuzzed, Mutation, fuzzed_allocations

pytestmark = [pytest.mark.e2e, pytest.mark.fuzz]

PATH = "/apis/melange.dev/v1alpha1/namespaces/{namespace}/melangeallocations"
POOLS = {"pool-a": 3, "pool-b": 2}
BATCH = 100
SKIPPED_RULES = "some validation rules were not checked because the object was invalid"


def base() -> dict[str, Any]:
    """A valid allocation over two Deployments: applied as is, it would resize both."""
    gpu = {"costPerHour": 1.0, "minReplicas": 0, "maxReplicas": 20}
    return {
        "apiVersion": f"{api.API_GROUP}/{api.API_VERSION}",
        "kind": api.KIND,
        "metadata": {"name": "fuzz"},
        "spec": {
            "buckets": {"inputTokens": [1, 100, 1000], "outputTokens": [1, 100, 1000]},
            "workload": {"distribution": [[3, 1], [1, 1]], "totalRate": 40.0},
            "sliceFactor": 4,
            "headroom": 0.1,
            "gpus": [
                {
                    **gpu,
                    "name": name,
                    "throughput": [[20, 6], [8, 2]] if k == 0 else [[30, 9], [12, 3]],
                    "costPerHour": 1.0 + k,
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": pool},
                }
                for k, (name, pool) in enumerate([("L4", "pool-a"), ("A10G", "pool-b")])
            ],
        },
    }


def json_safe(fuzzed: Fuzzed) -> bool:
    """JSON, the API server's wire format, carries no NaN or Infinity (only YAML can)."""
    try:
        json.dumps(fuzzed.document, allow_nan=False)
    except ValueError:
        return False
    return True


def with_spec(*mutations: Mutation, **values: Any) -> Fuzzed:
    """The base with some spec values changed (`gpus__0__costPerHour=...`)."""
    document = base()
    for key, value in values.items():
        node: Any = document["spec"]
        *parents, last = key.split("__")
        for part in parents:
            node = node[int(part) if part.isdigit() else part]
        node[last] = value
    return Fuzzed(document, "spec.", list(mutations))


# Accepted by the API server, but no plan can be made: the operator must say so and patch nothing.
ACCEPTED = [
    (
        "zero-throughputs",
        with_spec(gpus__0__throughput=[[0, 0], [0, 0]], gpus__1__throughput=[[0, 0], [0, 0]]),
    ),
    ("caps-too-low", with_spec(gpus__0__maxReplicas=0, gpus__1__maxReplicas=0)),
    # this failed every reconcile with an OverflowError (a traceback, no condition)
    (
        "throughput-1e-320",
        with_spec(
            gpus__0__throughput=[[1e-320, 1e-320], [1e-320, 1e-320]],
            gpus__1__throughput=[[5e-324, 5e-324], [5e-324, 5e-324]],
        ),
    ),
]


# Found accepted by the API server before it bounded them; each broke the operator.
REJECTED = [
    # a plan costing inf per hour: the status patch carried `Infinity`, which is not JSON (400)
    (
        "cost-1e308",
        with_spec(
            Mutation("odd_number", "gpus[0].costPerHour", "invalid"),
            gpus__0__costPerHour=1e308,
            gpus__1__costPerHour=1e308,
        ),
    ),
    # failed every reconcile with an OverflowError (a traceback, no condition)
    (
        "rate-1e308",
        with_spec(
            Mutation("odd_number", "workload.totalRate", "invalid"), workload__totalRate=1e308
        ),
    ),
    # every cell 1e307: the sum overflowed, the plan was for 0 req/s, all pools were set to 0
    (
        "cells-1e307",
        with_spec(
            Mutation("odd_number", "workload.distribution", "invalid"),
            workload__distribution=[[1e307, 1e307], [1e307, 1e307]],
        ),
    ),
    (
        "rate-just-above-1e9",
        with_spec(
            Mutation("bound", "workload.totalRate", "invalid"),
            workload__totalRate=1000000000.0000001,
        ),
    ),
    (
        "throughput-just-above-1e9",
        with_spec(
            Mutation("bound", "gpus[1].throughput[0][1]", "invalid"),
            gpus__1__throughput=[[30, 1000000000.0000001], [12, 3]],
        ),
    ),
]


def create(kube: Kube, namespace: str, name: str, document: Any) -> str | None:
    """Create the allocation as `kubectl apply` sends it; None when accepted, else the message."""
    body = json.loads(json.dumps(document))
    if isinstance(body, dict):
        metadata = body.get("metadata")
        body["metadata"] = {**(metadata if isinstance(metadata, dict) else {}), "name": name}
    try:
        kube.dynamic.request(
            "post",
            PATH.format(namespace=namespace),
            body=body,
            query_params=[("fieldValidation", "Strict")],
        )
    except DynamicApiError as exc:
        if exc.status not in (400, 422):
            raise
        return str(json.loads(exc.body or "{}").get("message"))
    return None


def names_a_field(message: str, paths: list[str]) -> bool:
    """The API server's message names one of `paths`, or a field above it (but not bare `spec`)."""
    for path in paths:
        candidates = [p for p in _ancestors(path) if p != "spec"]
        if any(p in message for p in candidates):
            return True
    return False


def too_large_for_json(message: str, document: Any) -> bool:
    """The API server's JSON decoder refuses a number beyond float64 before any validation, so its
    message quotes the number but names no field."""
    huge = [
        v
        for v in _leaves(document)
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 1e308
    ]
    return any(f"cannot unmarshal number {str(v)[:20]}" in message for v in huge)


def _leaves(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return [leaf for value in node.values() for leaf in _leaves(value)]
    if isinstance(node, list):
        return [leaf for value in node for leaf in _leaves(value)]
    return [node]


def _ancestors(path: str) -> list[str]:
    out = []
    for k in range(len(path), 0, -1):
        if k == len(path) or path[k] in ".[":
            out.append(path[:k])
    return out


def draw_batch(size: int) -> list[Fuzzed]:
    """`size` fuzzed allocations, the same each run (a fixed derandomized search), each with at least
    one change the API server must reject."""
    drawn: list[Fuzzed] = []

    @given(fuzzed_allocations(bases=[base()], require_invalid=True).filter(json_safe))
    @settings(
        max_examples=size,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    def collect(fuzzed: Fuzzed) -> None:
        drawn.append(fuzzed)

    collect()
    return drawn


def test_fuzzed_allocations_change_no_pool(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    batch = draw_batch(BATCH)
    assert len(batch) == BATCH
    for pool, replicas in POOLS.items():
        kube.deployment(pool, namespace, replicas)
    cases = [(f"fz-{k}", f) for k, f in enumerate(batch)] + [
        (f"fz-{name}", f) for name, f in [*REJECTED, *ACCEPTED]
    ]
    accepted: list[tuple[str, Fuzzed]] = []
    for name, fuzzed in cases:
        message = create(kube, namespace, name, fuzzed.document)
        if message is None:
            accepted.append((name, fuzzed))
            continue
        assert (
            names_a_field(message, fuzzed.invalid_paths)
            or too_large_for_json(message, fuzzed.document)
            # the API server checks no CEL rule of an object whose schema it already refused: then
            # it names the other change (one allowed to be invalid) instead of the rule's field
            or (SKIPPED_RULES in message and names_a_field(message, fuzzed.touched_paths))
        ), f"{name} ({fuzzed.describe()}): {message}"
    assert [n for n, _ in accepted] == [f"fz-{name}" for name, _ in ACCEPTED], (
        "a spec the model rejects was accepted by the API server"
    )

    for name, _ in accepted:
        ready = kube.wait_condition(name, namespace, "Ready", status="False", timeout=60)
        assert ready["reason"] in {"InvalidSpec", "Infeasible"}, ready

        def warned(name: str = name, ready: dict[str, Any] = ready) -> None:
            events = kube.events(namespace, involved=name)
            assert any(e["type"] == "Warning" and e["reason"] == ready["reason"] for e in events), (
                events
            )

        eventually(warned, timeout=30)

    time.sleep(4)  # more than one resync: a late patch would show
    events = control_plane_events(operator)
    created = {
        (e.get("objectRef") or {}).get("name")
        for e in events
        if (e.get("objectRef") or {}).get("resource") == "melangeallocations"
        and e.get("verb") == "create"
    }
    assert {name for name, _ in accepted} <= created  # the audit log sees this namespace's writes
    writes = [
        e
        for e in events
        if (e.get("objectRef") or {}).get("resource") == "deployments"
        and e.get("verb") in {"patch", "update"}
    ]
    assert writes == [], writes
    for pool, replicas in POOLS.items():
        assert kube.replicas(Kinds.deployment, pool, namespace) == replicas
    assert operator.process is not None
    assert operator.process.poll() is None, "the operator exited"
    assert "Traceback" not in operator.log()


def control_plane_events(operator: OperatorProcess) -> list[dict[str, Any]]:
    namespace = operator.namespace
    return [
        e
        for e in operator.control_plane.audit_events()
        if (e.get("objectRef") or {}).get("namespace") == namespace
    ]
