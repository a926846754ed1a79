"""The operator publishes each plan's routing table: in the status (`inputRouting`) and, with
`spec.routing.publishConfigMap`, in the ConfigMap `<allocation>-routing` that a router watches;
against the real API server (no garbage collector runs there, so the ownerReference is checked as
written, not by deleting the allocation), and a real `melange route` following it."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from kubernetes import client

from melange import api
from melange.plan import routing, solver
from melange.plan.problem import Problem
from tests.controlplane.harness import ControlPlane

from .kube import Kube, eventually, reasons
from .operator_process import OperatorProcess, terminate
from .prometheus import _get
from .test_operator import SPEC, make_pools, manifest, wait_ready
from .test_route import launch_router, send
from .test_route_kube import own_address, service_body, slice_body, start_sim

pytestmark = pytest.mark.e2e
SCHEMA = Path(routing.__file__).with_name("routing-schema.json")
NAME = "chat"
CONFIG_MAP = f"{NAME}-routing"


def published_spec(rate: float = 34) -> dict[str, Any]:
    spec = copy.deepcopy(SPEC)
    spec["workload"]["totalRate"] = rate
    spec["routing"] = {"publishConfigMap": True}
    spec["gpus"][0]["upstream"] = {"service": "llama-l4", "port": 8000}
    spec["gpus"][1]["upstream"] = {"service": "llama-a100", "port": "http"}
    return spec


def config_map(kube: Kube, namespace: str) -> Any:  # a V1ConfigMap, its metadata always set
    return client.CoreV1Api(kube.api_client).read_namespaced_config_map(CONFIG_MAP, namespace)


def expected_table(spec: dict[str, Any]) -> routing.RouteTable:
    parsed = api.validate_spec(spec)
    problem = Problem.from_spec(parsed)
    return routing.derive(problem, solver.solve(problem))


def published_table(kube: Kube, namespace: str) -> dict[str, Any]:
    data = config_map(kube, namespace).data or {}
    document: dict[str, Any] = json.loads(data["table.json"])
    return document


def test_the_table_is_published_in_status_and_configmap_and_follows_the_plan(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    make_pools(kube, namespace)
    allocation = kube.create(manifest(NAME, published_spec()), namespace)
    wait_ready(kube, NAME, namespace)
    kube.wait_condition(NAME, namespace, "RoutingPublished", "True", "Published", CONFIG_MAP)

    stored = config_map(kube, namespace)
    owners = stored.metadata.owner_references
    assert [(o.kind, o.name, o.uid, o.controller) for o in owners] == [
        ("MelangeAllocation", NAME, allocation["metadata"]["uid"], True)
    ]
    document = published_table(kube, namespace)
    jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text())).validate(document)
    assert document["upstreams"] == {
        "L4": {"namespace": namespace, "service": "llama-l4", "port": 8000},
        "A100": {"namespace": namespace, "service": "llama-a100", "port": "http"},
    }
    table = routing.from_dict(document)
    expected = expected_table(published_spec())
    for got, want in zip(table.by_input, expected.by_input, strict=True):
        assert got == pytest.approx(want, abs=1e-9)

    status = kube.allocation(NAME, namespace)["status"]
    assert status["routingConfigMap"] == CONFIG_MAP
    assert status["inputRoutingError"] == pytest.approx(expected.input_load_error, abs=1e-6)
    edges = expected.input_edges
    assert [row["inputTokens"] for row in status["inputRouting"]] == [
        [edges[i], edges[i + 1]] for i in range(len(edges) - 1)
    ]
    for row, want in zip(status["inputRouting"], expected.by_input, strict=True):
        shares = {s["gpu"]: s["fraction"] for s in row["shares"]}
        assert shares == {
            g: pytest.approx(w, abs=1e-6) for g, w in zip(expected.gpus, want, strict=True) if w > 0
        }

    # An outside edit is set back within a resync (3 s here), as a pool's count is.
    core = client.CoreV1Api(kube.api_client)
    core.patch_namespaced_config_map(CONFIG_MAP, namespace, {"data": {"table.json": "{}"}})
    eventually(lambda: _equal(published_table(kube, namespace), document), timeout=20)

    # A new plan (a lower rate) rewrites the table, in place.
    version = config_map(kube, namespace).metadata.resource_version
    kube.merge_patch(
        ("melange.dev/v1alpha1", "MelangeAllocation"),
        NAME,
        namespace,
        {"spec": {"workload": {"totalRate": 6}}},
    )
    lower = expected_table(published_spec(6))
    assert lower.by_input != expected.by_input, "the test needs a rate whose table differs"

    def rewritten() -> None:
        now = routing.from_dict(published_table(kube, namespace))
        for got, want in zip(now.by_input, lower.by_input, strict=True):
            assert got == pytest.approx(want, abs=1e-9)

    eventually(rewritten, timeout=30)
    assert config_map(kube, namespace).metadata.resource_version != version

    # Publishing turned off: the ConfigMap it wrote goes, the status says nothing of it.
    kube.merge_patch(
        ("melange.dev/v1alpha1", "MelangeAllocation"),
        NAME,
        namespace,
        {"spec": {"routing": {"publishConfigMap": False}}},
    )

    def removed() -> None:
        listed: Any = client.CoreV1Api(kube.api_client).list_namespaced_config_map(namespace)
        names = [c.metadata.name for c in listed.items]
        assert CONFIG_MAP not in names
        status = kube.allocation(NAME, namespace)["status"]
        assert "routingConfigMap" not in status
        assert kube.condition(NAME, namespace, "RoutingPublished") is None
        assert status["inputRouting"], "the status keeps the table by input length"

    eventually(removed, timeout=30)


def test_a_configmap_the_allocation_does_not_own_is_left_alone(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    core = client.CoreV1Api(kube.api_client)
    core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=CONFIG_MAP), data={"table.json": "someone's"}
        ),
    )
    make_pools(kube, namespace)
    kube.create(manifest(NAME, published_spec()), namespace)
    wait_ready(kube, NAME, namespace)  # the pools follow the plan all the same
    kube.wait_condition(
        NAME, namespace, "RoutingPublished", "False", "ConfigMapConflict", "not owned"
    )
    stored = config_map(kube, namespace)
    assert stored.data == {"table.json": "someone's"}
    assert not stored.metadata.owner_references
    # one Warning when the conflict starts, not one per reconcile (a resync is 3 s here)
    time.sleep(8)
    assert reasons(kube.events(namespace, NAME)).count("ConfigMapConflict") == 1
    assert config_map(kube, namespace).data == {"table.json": "someone's"}

    # Turning publishing off must not delete what the allocation never owned either.
    kube.merge_patch(
        ("melange.dev/v1alpha1", "MelangeAllocation"),
        NAME,
        namespace,
        {"spec": {"routing": {"publishConfigMap": False}}},
    )
    eventually(lambda: _no_condition(kube, namespace), timeout=30)
    assert config_map(kube, namespace).data == {"table.json": "someone's"}


def _no_condition(kube: Kube, namespace: str) -> None:
    assert kube.condition(NAME, namespace, "RoutingPublished") is None


def test_a_router_follows_the_plan_the_operator_publishes(
    control_plane: ControlPlane,
    kube: Kube,
    namespace: str,
    operator: OperatorProcess,
    tmp_path: Path,
) -> None:
    """The whole path: a new plan (the rate moved) reaches a running `melange route` through the
    ConfigMap, without a restart. At 6 req/s the plan is one A100, which gets the short prompts;
    at 34 req/s two L4s join and the short prompts go to them. The engines are gpusim servers
    behind Services whose EndpointSlices the test writes (no EndpointSlice controller runs on
    the test control plane)."""
    short_prompts = [0] * 20  # 10-word prompts: the input bucket [1, 100)
    low, high = expected_table(published_spec(6)), expected_table(published_spec(34))
    assert low.by_input[0][low.gpus.index("A100")] == 1.0, "the test needs A100 alone at 6"
    assert high.by_input[0][high.gpus.index("L4")] == 1.0, "and L4 alone at 34"

    host = own_address()
    core = client.CoreV1Api(kube.api_client)
    discovery = client.DiscoveryV1Api(kube.api_client)
    sims = {gpu: start_sim(tmp_path, host) for gpu in ("L4", "A100")}
    router = None
    try:
        for gpu, service in (("L4", "llama-l4"), ("A100", "llama-a100")):
            core.create_namespaced_service(
                namespace,
                service_body(service, {"name": "http", "port": 8000, "targetPort": "http"}),
            )
            discovery.create_namespaced_endpoint_slice(
                namespace, slice_body(f"{service}-0", service, sims[gpu], "http")
            )
        make_pools(kube, namespace)
        kube.create(manifest(NAME, published_spec(6)), namespace)
        wait_ready(kube, NAME, namespace)
        kube.wait_condition(NAME, namespace, "RoutingPublished", "True", "Published")
        router = launch_router(
            tmp_path, f"--table-configmap={namespace}/{CONFIG_MAP}", env=control_plane.env()
        )
        eventually(lambda: _status(f"{router.url}/readyz", 200), timeout=20)
        assert set(send(router.url, short_prompts)) == {200}
        assert (len(sims["A100"].requests()), len(sims["L4"].requests())) == (20, 0)

        kube.merge_patch(
            ("melange.dev/v1alpha1", "MelangeAllocation"),
            NAME,
            namespace,
            {"spec": {"workload": {"totalRate": 34}}},
        )
        router.wait_for(r'melange_route_table_reloads_total\{result="ok"\}', 2)
        assert set(send(router.url, short_prompts)) == {200}
        assert (len(sims["A100"].requests()), len(sims["L4"].requests())) == (20, 20)
    finally:
        if router is not None:
            terminate(router.process)
            print(f"--- route log (tail) ---\n{router.log_path.read_text()[-4000:]}")
        for sim in sims.values():
            terminate(sim.process)


def _equal(actual: object, expected: object) -> None:
    assert actual == expected


def _status(url: str, expected: int) -> None:
    assert _get(url)[0] == expected
