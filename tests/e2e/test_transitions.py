"""A real fleet's operations end to end: make-before-break, capacity caps and churn.

Two node pools on the real API server: `small` (A: cheap, 10 req/s each) is a kind without a
status (it counts as ready at once), `big` (B: 40 req/s each, cheaper per request) is a
MachineDeployment, a kind with a status subresource: none of its replicas is ready until the test
sets `status.readyReplicas`, as the pool's own controller would once nodes join. At 9 req/s the plan is one A; at 35 req/s one B.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.controlplane.harness import ControlPlane

from .kube import Kinds, Kube, eventually
from .operator_process import RESYNC_SECONDS, OperatorProcess
from .prometheus import MODEL, GaugeExporter, LoadEmitter, PrometheusServer

pytestmark = pytest.mark.e2e

THROUGHPUT = {"A": 10.0, "B": 40.0}


def spec(rate: float, **extra: Any) -> dict[str, Any]:
    return {
        "buckets": {"inputTokens": [1, 100], "outputTokens": [1, 100]},
        "workload": {"distribution": [[1]], "totalRate": rate},
        "sliceFactor": 8,
        "gpus": [
            {
                "name": "A",
                "costPerHour": 1.0,
                "throughput": [[THROUGHPUT["A"]]],
                "scaleTargetRef": {
                    "apiVersion": "test.melange.dev/v1",
                    "kind": "NodePool",
                    "name": "small",
                },
                "replicasPath": "/spec/size",
            },
            {
                "name": "B",
                "costPerHour": 3.0,
                "throughput": [[THROUGHPUT["B"]]],
                "scaleTargetRef": {
                    "apiVersion": "cluster.x-k8s.io/v1beta1",
                    "kind": "MachineDeployment",
                    "name": "big",
                },
            },
        ],
        **extra,
    }


def create(kube: Kube, namespace: str, name: str, body: dict[str, Any]) -> None:
    kube.create(
        {
            "apiVersion": "melange.dev/v1alpha1",
            "kind": "MelangeAllocation",
            "metadata": {"name": name},
            "spec": body,
        },
        namespace,
    )


def set_rate(kube: Kube, namespace: str, name: str, rate: float) -> None:
    kube.merge_patch(Kinds.allocation, name, namespace, {"spec": {"workload": {"totalRate": rate}}})


def make_pools(kube: Kube, namespace: str, small: int = 0) -> None:
    """A's pool at `small` replicas, B's at none."""
    kube.node_pool("small", namespace, small)
    kube.machine_deployment("big", namespace, 0)


def counts(kube: Kube, namespace: str) -> dict[str, int | None]:
    return {
        "A": kube.replicas(Kinds.node_pool, "small", namespace),
        "B": kube.replicas(Kinds.machine_deployment, "big", namespace),
    }


def pool_versions(kube: Kube, namespace: str) -> tuple[str, str]:
    """Both pools' resourceVersions: equal later only if neither was written in between."""
    return (
        kube.resource_version(Kinds.node_pool, "small", namespace),
        kube.resource_version(Kinds.machine_deployment, "big", namespace),
    )


@contextmanager
def scraped(
    emitter: LoadEmitter, workdir: Path, values: dict[str, float]
) -> Iterator[tuple[GaugeExporter, PrometheusServer]]:
    """An exporter of these gauges and a Prometheus scraping it and the emitter, once it has
    scraped them (each query + 1, so a gauge at 0 counts too)."""
    exporter = GaugeExporter()
    exporter.values.update(values)
    server = PrometheusServer(workdir, [emitter.address, exporter.address])
    server.start()
    try:
        for series in values:
            server.wait_for_value(f"{series} + 1")
        yield exporter, server
    finally:
        server.stop()
        exporter.stop()


class Sampler:
    """Reads both pools every 0.2 s (and the B ready count the test set) in the background."""

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube, self.namespace = kube, namespace
        self.ready_b = 0
        self.samples: list[tuple[float, dict[str, int | None], int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), counts(self.kube, self.namespace), self.ready_b))
            self._stop.wait(0.2)

    def mark_ready(self, ready: int) -> None:
        self.kube.set_ready(Kinds.machine_deployment, "big", self.namespace, ready)
        self.ready_b = ready

    @contextmanager
    def running(self) -> Iterator[Sampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


def served(sample: dict[str, int | None], ready_b: int) -> float:
    """Requests per second the ready fleet serves (A counts as ready at its count)."""
    return (sample["A"] or 0) * THROUGHPUT["A"] + ready_b * THROUGHPUT["B"]


def test_make_before_break_keeps_the_old_capacity_until_the_new_is_ready(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    make_pools(kube, namespace, small=1)
    create(kube, namespace, "mbb", spec(9, transition={"readyTimeoutSeconds": 600}))
    kube.wait_condition("mbb", namespace, "Ready", "True", "Reconciled")
    assert counts(kube, namespace) == {"A": 1, "B": 0}

    sampler = Sampler(kube, namespace)
    with sampler.running():
        set_rate(kube, namespace, "mbb", 35)
        eventually(lambda: _assert(counts(kube, namespace) == {"A": 1, "B": 1}))
        waiting = kube.wait_condition("mbb", namespace, "Transitioning", "True", "WaitingForReady")
        assert "B: plan 1, asked 1, ready 0" in waiting["message"]
        assert "A: plan 0, asked 1" in waiting["message"]
        assert (kube.condition("mbb", namespace, "Ready") or {}).get("reason") == "Transitioning"
        time.sleep(8)  # more than one readiness check: A must still be there
        assert counts(kube, namespace)["A"] == 1
        marked = time.monotonic()
        sampler.mark_ready(1)
        eventually(lambda: _assert(counts(kube, namespace) == {"A": 0, "B": 1}), timeout=30)
        kube.wait_condition("mbb", namespace, "Transitioning", "False", "AtPlan")
        kube.wait_condition("mbb", namespace, "Ready", "True", "Reconciled")

    removed = [t for t, sample, _ in sampler.samples if sample["A"] == 0]
    assert removed
    assert min(removed) > marked  # A went only after B was ready
    # the ready fleet never served less than the smaller of the two plans' rates (9 and 35)
    assert min(served(sample, ready) for _, sample, ready in sampler.samples) >= 9
    targets = {t["name"]: t for t in kube.allocation("mbb", namespace)["status"]["targets"]}
    assert targets["B"]["readyReplicas"] == 1
    assert targets["B"]["plannedReplicas"] == 1


def test_scale_down_goes_ahead_after_the_ready_timeout(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    make_pools(kube, namespace, small=1)
    create(kube, namespace, "slow", spec(9, transition={"readyTimeoutSeconds": 6}))
    kube.wait_condition("slow", namespace, "Ready", "True", "Reconciled")
    set_rate(kube, namespace, "slow", 35)
    eventually(lambda: _assert(counts(kube, namespace) == {"A": 1, "B": 1}))
    began = time.monotonic()
    eventually(lambda: _assert(counts(kube, namespace)["A"] == 0), timeout=40)
    assert time.monotonic() - began >= 4  # not before the timeout (less the polling slack)
    # B never became ready: still transitioning, and not Ready
    assert (kube.condition("slow", namespace, "Ready") or {}).get("status") == "False"


def test_a_type_without_capacity_is_capped_and_its_traffic_moves(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    make_pools(kube, namespace, small=0)
    transition = {"capacityTimeoutSeconds": 3, "capacityRetrySeconds": 20}
    create(kube, namespace, "short", spec(35, transition=transition))
    eventually(lambda: _assert(counts(kube, namespace)["B"] == 1))
    # B never becomes ready: capped at 0 (what is ready), the plan moves to four A
    limited = kube.wait_condition("short", namespace, "CapacityLimited", "True", "CapacityShort")
    assert "B is capped at 0" in limited["message"]
    eventually(lambda: _assert(counts(kube, namespace) == {"A": 4, "B": 0}), timeout=30)
    status = kube.allocation("short", namespace)["status"]
    assert [c["name"] for c in status["gpuCaps"]] == ["B"]
    kube.wait_events(namespace, "short", "CapacityShort")
    # after the retry time B is asked for again (A stays until it is ready: make-before-break)
    eventually(lambda: _assert(counts(kube, namespace) == {"A": 4, "B": 1}), timeout=40)
    kube.wait_events(namespace, "short", "CapacityRetry")


def test_a_new_mix_that_saves_less_than_min_savings_patches_nothing(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    make_pools(kube, namespace, small=0)
    create(kube, namespace, "calm", spec(35, minSavings=0.5))
    kube.wait_condition("calm", namespace, "Ready", "True", "Reconciled")
    assert counts(kube, namespace) == {"A": 0, "B": 1}
    versions = pool_versions(kube, namespace)
    # at 28 req/s three A cost what one B does: no saving, so nothing moves
    set_rate(kube, namespace, "calm", 28)
    solved = eventually(lambda: _solved_at(kube, namespace, "calm", 28))
    assert "kept: the current counts still serve the rate" in solved["message"]
    time.sleep(4)  # a resync or more
    assert versions == pool_versions(kube, namespace)
    # at 9 req/s one A (1/h) saves two thirds of 3/h: more than minSavings, so it moves
    set_rate(kube, namespace, "calm", 9)
    eventually(lambda: _assert(counts(kube, namespace) == {"A": 1, "B": 0}))


def _solved_at(kube: Kube, namespace: str, name: str, rate: float) -> dict[str, Any]:
    status = kube.allocation(name, namespace).get("status") or {}
    assert status.get("solvedRate") == rate
    solved = kube.condition(name, namespace, "Solved")
    assert solved is not None
    return solved


def _assert(ok: bool) -> None:
    assert ok


def _solved_for_activation(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    solved = kube.condition(name, namespace, "Solved") or {}
    assert "requests wait" in solved.get("message", "")
    return solved


def _prices_shown(
    kube: Kube, namespace: str, name: str, gpu: str, price: float
) -> dict[str, dict[str, Any]]:
    status = kube.allocation(name, namespace).get("status") or {}
    shown = {p["name"]: p for p in status.get("prices", [])}
    assert shown[gpu]["costPerHour"] == price
    return shown


# -- prices ---------------------------------------------------------------------------------------

PRICE_QUERY = 'spot_price_per_hour{gpu="B"}'


def test_a_price_step_in_prometheus_re_solves_and_a_missing_price_holds(
    kube: Kube,
    namespace: str,
    operator: OperatorProcess,
    emitter: LoadEmitter,
    tmp_path: Path,
) -> None:
    with scraped(emitter, tmp_path / "prices", {PRICE_QUERY: 3.0}) as (exporter, server):
        server.wait_for_value(f"sum(rate({emitter.metric_name}[4s]))")
        make_pools(kube, namespace, small=0)
        body = spec(35)
        body["gpus"][1]["costPerHourFrom"] = {"prometheusQuery": PRICE_QUERY}
        body["rateSource"] = {
            "prometheus": {"url": server.url, "modelName": MODEL, "rangeSeconds": 4},
            "intervalSeconds": 5,
        }
        create(kube, namespace, "spot", body)
        # at the emitter's 34 req/s: one B at 3/h beats four A at 4/h
        eventually(lambda: _assert(counts(kube, namespace) == {"A": 0, "B": 1}))
        observed = kube.wait_condition("spot", namespace, "PricesObserved", "True", "Observed")
        assert "B 3/h" in observed["message"]

        exporter.values[PRICE_QUERY] = 5.0  # a price step: four A (4/h) are now the cheaper
        eventually(lambda: _assert(counts(kube, namespace) == {"A": 4, "B": 0}), timeout=40)
        # the pools are patched before the status is written: wait for the status too
        shown = eventually(lambda: _prices_shown(kube, namespace, "spot", "B", 5.0))
        assert shown["B"]["costPerHour"] == 5.0
        assert shown["B"]["source"] == f"Prometheus {PRICE_QUERY}"
        assert shown["A"] == {"name": "A", "costPerHour": 1.0, "source": "spec"}
        kube.wait_events(namespace, "spot", "PriceChange")

        del exporter.values[PRICE_QUERY]  # the series goes stale: no price, the plan holds
        kube.wait_condition("spot", namespace, "PricesObserved", "False", "NoData", timeout=40)
        versions = pool_versions(kube, namespace)
        time.sleep(12)  # two polls and more
        assert versions == pool_versions(kube, namespace)
        prices_now = {
            p["name"]: p["costPerHour"]
            for p in kube.allocation("spot", namespace)["status"]["prices"]
        }
        assert prices_now["B"] == 5.0  # the plan keeps the prices it was solved with

        exporter.values[PRICE_QUERY] = 2.0  # back, and cheaper than ever: one B again
        eventually(lambda: _assert(counts(kube, namespace) == {"A": 0, "B": 1}), timeout=40)


def test_a_price_from_a_config_map_its_owner_opted_in(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    core = client.CoreV1Api(kube.api_client)
    config_map = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="prices"), data={"b": "5.0"})
    core.create_namespaced_config_map(namespace, config_map)
    make_pools(kube, namespace, small=0)
    body = spec(35)
    body["gpus"][1]["costPerHourFrom"] = {"configMapKeyRef": {"name": "prices", "key": "b"}}
    create(kube, namespace, "listed", body)
    # not labelled as a price source: not read, the spec's own price (3/h) plans one B
    refused = kube.wait_condition(
        "listed", namespace, "PricesObserved", "False", "PriceUnavailable"
    )
    assert "melange.dev/price-source=true" in refused["message"]
    eventually(lambda: _assert(counts(kube, namespace) == {"A": 0, "B": 1}))
    core.patch_namespaced_config_map(
        "prices", namespace, {"metadata": {"labels": {"melange.dev/price-source": "true"}}}
    )
    eventually(lambda: _assert(counts(kube, namespace) == {"A": 4, "B": 0}), timeout=30)
    kube.wait_condition("listed", namespace, "PricesObserved", "True", "Observed")


# -- a budget shared by allocations ---------------------------------------------------------------


def test_a_shared_budget_is_never_exceeded(
    control_plane: ControlPlane, kube: Kube, namespace: str, tmp_path: Path
) -> None:
    """Three allocations each plan two B at 80 req/s; the cluster allows five B in all."""
    operator = OperatorProcess(
        control_plane,
        namespace,
        tmp_path,
        extra_args=("--resync-seconds", str(RESYNC_SECONDS), "--gpu-budget", "B=5"),
    )
    names = ("one", "two", "three")
    for name in names:
        kube.node_pool(f"small-{name}", namespace, 0)
        kube.machine_deployment(f"big-{name}", namespace, 0)
    total_b: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            total_b.append(
                sum(
                    kube.replicas(Kinds.machine_deployment, f"big-{name}", namespace) or 0
                    for name in names
                )
            )
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    operator.start()
    try:
        for name in names:
            body = spec(80)
            body["gpus"][0]["scaleTargetRef"]["name"] = f"small-{name}"
            body["gpus"][1]["scaleTargetRef"]["name"] = f"big-{name}"
            create(kube, namespace, name, body)
        for name in names:
            kube.wait_condition(name, namespace, "Ready", "True", "Reconciled")
        limited = [
            name
            for name in names
            if (kube.condition(name, namespace, "BudgetLimited") or {}).get("status") == "True"
        ]
        assert len(limited) == 1, limited  # two got their two B, the third what was left
        message = (kube.condition(limited[0], namespace, "BudgetLimited") or {})["message"]
        assert "B: the plan would use 2, the cluster budget of 5 leaves 1" in message
        held = {
            name: kube.replicas(Kinds.machine_deployment, f"big-{name}", namespace) or 0
            for name in names
        }
        assert sorted(held.values()) == [1, 2, 2]
        # the one short of B serves its traffic with A instead: 40 req/s on B, 40 on four A
        assert kube.replicas(Kinds.node_pool, f"small-{limited[0]}", namespace) == 4
        # one of the others needs less: the B it gives back goes to the one that was short
        lower = next(name for name in names if name not in limited)
        set_rate(kube, namespace, lower, 9)
        kube.wait_condition(limited[0], namespace, "BudgetLimited", "False", "WithinBudget")
        eventually(
            lambda: _assert(
                kube.replicas(Kinds.machine_deployment, f"big-{limited[0]}", namespace) == 2
            )
        )
        time.sleep(3)
    finally:
        stop.set()
        sampler.join()
        operator.stop()
    assert total_b
    assert max(total_b) <= 5, max(total_b)


# -- scale from zero ------------------------------------------------------------------------------

PENDING = "gateway_pending_requests"


def test_requests_waiting_wake_an_allocation_at_zero(
    kube: Kube,
    namespace: str,
    operator: OperatorProcess,
    emitter: LoadEmitter,
    tmp_path: Path,
) -> None:
    emitter.set_rate(0)
    with scraped(emitter, tmp_path / "activation", {PENDING: 0}) as (exporter, server):
        make_pools(kube, namespace, small=0)
        body = spec(35)
        body["rateSource"] = {
            "prometheus": {
                "url": server.url,
                "modelName": MODEL,
                "rangeSeconds": 4,
                "activationQuery": PENDING,
            },
            "intervalSeconds": 5,
            "scaleDownStabilizationSeconds": 0,
        }
        create(kube, namespace, "idle", body)
        # no traffic, nobody waiting: nothing runs
        eventually(lambda: _solved_at(kube, namespace, "idle", 0), timeout=40)
        eventually(lambda: _assert(counts(kube, namespace) == {"A": 0, "B": 0}))

        exporter.values[PENDING] = 3  # requests wait at the gateway
        eventually(lambda: _assert(counts(kube, namespace) == {"A": 0, "B": 1}), timeout=30)
        # the pools are patched before the status is written: wait for the status too
        solved = eventually(lambda: _solved_for_activation(kube, namespace, "idle"))
        assert "requests wait (the activation query reads 3)" in solved["message"]
        assert kube.allocation("idle", namespace)["status"]["observedActivation"] == 3

        exporter.values[PENDING] = 0  # served, and still no traffic: back to zero
        eventually(lambda: _assert(counts(kube, namespace) == {"A": 0, "B": 0}), timeout=30)


def test_a_step_limit_moves_a_pool_one_step_per_interval(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    make_pools(kube, namespace, small=1)
    body = spec(9)
    body["gpus"][0]["maxScaleUpPerInterval"] = 1
    body["gpus"][1]["maxReplicas"] = 0  # A alone
    create(kube, namespace, "steps", body)
    kube.wait_condition("steps", namespace, "Ready", "True", "Reconciled")
    seen = [1]

    def at_four() -> None:
        count = counts(kube, namespace)["A"]
        if count != seen[-1]:
            seen.append(count or 0)
        assert count == 4

    set_rate(kube, namespace, "steps", 35)
    kube.wait_condition("steps", namespace, "Scaled", "False", "Transitioning")
    eventually(at_four, timeout=60, interval=0.1)
    assert seen == [1, 2, 3, 4]  # one replica per interval (the resync, 3 s)
    kube.wait_condition("steps", namespace, "Ready", "True", "Reconciled")
