"""A competing writer keeps updating the pool objects while the operator scales them.

The competitor reads each pool and writes it back whole (a PUT, conditional on the resourceVersion
it read) with a new annotation, as fast as it can, so the operator's conditional /scale patches
meet 409 Conflicts. The operator must read again, retry, and reach every plan; neither side may
lose a write (the competitor's PUT carries the replica count it read: were it not conditional, it
would set the pool back), and no pool may flap.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import pytest
from kubernetes.dynamic.exceptions import ConflictError

from tests.e2e.kube import Kinds, Kube, eventually
from tests.e2e.operator_process import OperatorProcess
from tests.e2e.test_operator import make_pools, manifest, pool_replicas, wait_ready

from . import audit
from .plans import POOL_GPU, by_pool, equal, plan_at, spec_at

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

COMPETITOR = "chaos-competitor"
ANNOTATION = "chaos.melange.dev/writes"
INITIAL_RATE = 34
RATES = [40, 55, 61, 79, 91, 46, 58, 67, 85, 52]  # each changes the L4 plan, half the A100's
CONTENDED = {"pool-l4": Kinds.deployment, "pool-a100": Kinds.machine_deployment}


class Competitor:
    """One thread per pool: read the whole object, add to the annotation, PUT it back."""

    def __init__(self, kubeconfig: Path, namespace: str) -> None:
        self.kube = Kube(kubeconfig)
        self.kube.api_client.user_agent = COMPETITOR
        self.namespace = namespace
        self.stopping = threading.Event()
        self.written: dict[str, int] = dict.fromkeys(CONTENDED, 0)  # last counter stored
        self.conflicts: dict[str, int] = dict.fromkeys(CONTENDED, 0)
        self.errors: list[str] = []
        self.threads = [
            threading.Thread(target=self._run, args=(name,), daemon=True) for name in CONTENDED
        ]

    def __enter__(self) -> Competitor:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def _run(self, name: str) -> None:
        resource = self.kube.resource(CONTENDED[name])
        counter = 0
        while not self.stopping.is_set():
            try:
                obj = self.kube.dynamic.get(resource, name=name, namespace=self.namespace).to_dict()
                counter += 1
                obj["metadata"].setdefault("annotations", {})[ANNOTATION] = str(counter)
                self.kube.dynamic.replace(resource, body=obj, namespace=self.namespace)
                self.written[name] = counter
            except ConflictError:
                self.conflicts[name] += 1
            except Exception as exc:  # reported by the test, not swallowed
                self.errors.append(f"{name}: {exc!r}")
                return


def test_the_operator_reaches_every_plan_through_conflicts_without_losing_writes(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    make_pools(kube, namespace)
    kube.create(manifest("chat", spec_at(INITIAL_RATE)), namespace)
    wait_ready(kube, "chat", namespace)
    # the pools as created (1 replica each), then the plan of the allocation and of each edit
    plans = [dict.fromkeys(POOL_GPU, 1)]
    plans += [by_pool(plan_at(rate)) for rate in [INITIAL_RATE, *RATES]]

    with Competitor(operator.control_plane.kubeconfig_path, namespace) as competitor:
        for rate, plan in zip(RATES, plans[2:], strict=True):
            kube.merge_patch(
                Kinds.allocation, "chat", namespace, {"spec": {"workload": {"totalRate": rate}}}
            )

            def reached(plan: dict[str, int] = plan) -> None:
                equal(_by_name(kube, namespace), plan)

            eventually(reached, timeout=90)
        wait_ready(kube, "chat", namespace)
    assert competitor.errors == []

    patches = audit.pool_patches(operator.writes(), namespace)
    conflicts = [e for e in patches if audit.code(e) == 409]
    print(
        f"operator: {len(audit.succeeded(patches))} pool writes, {len(conflicts)} refused with 409; "
        f"competitor: {competitor.written} writes, {competitor.conflicts} conflicts"
    )
    failed = [e for e in kube.events(namespace, "chat") if e["reason"] == "ScaleFailed"]
    print(f"pool writes: {audit.patched_values(patches)}; ScaleFailed Events: {len(failed)}")
    assert conflicts, "the competitor caused no conflict: the fault was not injected"
    assert all(competitor.written[name] > 0 for name in CONTENDED)

    # each pool written once per change of its plan, in order: no retry lost, none repeated
    expected: dict[str, list[int]] = {}
    for before, after in itertools.pairwise(plans):
        for name, value in after.items():
            if value != before[name]:
                expected.setdefault(name, []).append(value)
    equal(audit.patched_values(patches), expected)
    # nobody else changed a count: the competitor's whole-object writes never set one back
    outside = [e for e in kube.events(namespace, "chat") if e["reason"] == "OutsideChange"]
    assert outside == []
    # and the operator's patches never dropped the competitor's last write
    for name, kind in CONTENDED.items():
        annotations = kube.get(kind, name, namespace)["metadata"].get("annotations") or {}
        assert annotations.get(ANNOTATION) == str(competitor.written[name])
    equal(pool_replicas(kube, namespace), plan_at(RATES[-1]))


def _by_name(kube: Kube, namespace: str) -> dict[str, int]:
    replicas = pool_replicas(kube, namespace)
    return by_pool({gpu: value or 0 for gpu, value in replicas.items()})
