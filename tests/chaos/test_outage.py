"""The API server and etcd stopped for 30 s while the operator runs, then started again.

This scenario stops its control plane, so it runs on one of its own (the session's is shared).
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.controlplane.harness import ControlPlane
from tests.e2e.kube import CRD_FILE, MANIFESTS, Kinds, Kube, eventually
from tests.e2e.operator_process import RESYNC_SECONDS as RESYNC
from tests.e2e.operator_process import OperatorProcess
from tests.e2e.test_operator import make_pools, manifest, pool_replicas, wait_ready

from . import audit
from .plans import by_pool, equal, plan_at, spec_at

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

OUTAGE_SECONDS = 30


@pytest.fixture(scope="module")
def own_control_plane() -> Iterator[ControlPlane]:
    with ControlPlane(audit=True) as cp:
        yield cp


def _prepared(cp: ControlPlane) -> tuple[Kube, str]:
    """The CRDs on this control plane (again is fine), and a namespace of the test's own."""
    kube = Kube(cp.kubeconfig_path)
    for document in [*kube.apply_file(CRD_FILE), *kube.apply_file(MANIFESTS / "test-targets.yaml")]:
        kube.wait_established(document["metadata"]["name"])
    namespace = f"t-{uuid.uuid4().hex[:10]}"
    kube.create_namespace(namespace)
    return kube, namespace


def test_an_outage_of_the_control_plane_patches_nothing_and_reconciling_resumes(
    own_control_plane: ControlPlane, tmp_path: Path
) -> None:
    cp = own_control_plane
    kube, namespace = _prepared(cp)
    make_pools(kube, namespace)
    operator = OperatorProcess(
        cp, namespace, tmp_path, extra_args=("--resync-seconds", str(RESYNC))
    )
    operator.start()
    try:
        kube.create(manifest("chat", spec_at(34)), namespace)
        wait_ready(kube, "chat", namespace)
        equal(pool_replicas(kube, namespace), plan_at(34))

        stopped = time.time()
        cp.stop_servers()
        deadline = time.monotonic() + OUTAGE_SECONDS
        while time.monotonic() < deadline:  # the operator rides the outage out
            assert operator.process is not None
            assert operator.process.poll() is None, f"operator exited:\n{operator.log()}"
            time.sleep(1)
        cp.start_servers()
        assert operator.process is not None
        assert operator.process.poll() is None, f"operator exited:\n{operator.log()}"

        # nothing changed, so coming back patches nothing; several resyncs pass
        seen = _reconciles(operator, "chat")
        eventually(lambda: equal(_reconciles(operator, "chat") >= seen + 2, True), timeout=90)
        edited = time.time()
        assert (
            audit.pool_patches(audit.between(operator.writes(), stopped, edited), namespace) == []
        )

        # a spec edit made after the outage is applied
        kube.merge_patch(
            Kinds.allocation, "chat", namespace, {"spec": {"workload": {"totalRate": 68}}}
        )
        generation = int(kube.allocation("chat", namespace)["metadata"]["generation"])
        eventually(lambda: equal(pool_replicas(kube, namespace), plan_at(68)), timeout=60)
        eventually(
            lambda: equal(
                kube.allocation("chat", namespace)["status"]["observedGeneration"], generation
            ),
            timeout=60,
        )
        wait_ready(kube, "chat", namespace)
        assert plan_at(68) != plan_at(34)
        after = audit.patched_values(
            audit.pool_patches(audit.between(operator.writes(), edited, time.time()), namespace)
        )
        print(f"pool writes after the outage's edit: {after}")
        wanted = by_pool(plan_at(68))
        before = by_pool(plan_at(34))
        assert after == {p: [wanted[p]] for p in wanted if wanted[p] != before[p]}, after
        assert operator.process.poll() is None
    finally:
        operator.stop()
        print(f"--- operator log (tail) ---\n{operator.log()[-12000:]}")


def test_a_deletion_the_watch_missed_frees_the_pools_it_held(
    own_control_plane: ControlPlane, tmp_path: Path
) -> None:
    """The operator is frozen while its watch connection is cut, an allocation is deleted, etcd
    compacts its history and the API server restarts: the watch's resourceVersion is then too old
    (410 Gone), so Kopf lists again, and a LIST brings no DELETED event. The next allocation on those pools must not wait
    on a ghost."""
    cp = own_control_plane
    kube, namespace = _prepared(cp)
    make_pools(kube, namespace)
    operator = OperatorProcess(
        cp, namespace, tmp_path, identity="gap", extra_args=("--resync-seconds", str(RESYNC))
    )
    operator.start()
    assert operator.process is not None
    try:
        kube.create(manifest("first", spec_at(34)), namespace)
        wait_ready(kube, "first", namespace)
        time.sleep(1.1)  # creation times have whole seconds: "heir" is the later
        kube.create(manifest("heir", spec_at(68)), namespace)
        kube.wait_condition("heir", namespace, "Ready", "False", "TargetConflict")

        operator.process.send_signal(signal.SIGSTOP)
        try:
            cp.restart(0.5)  # its watch connection is cut before the deletion: none in flight
            kube.delete(Kinds.allocation, "first", namespace)
            cp.compact_etcd()  # no history left to replay the deletion from
            cp.restart(0.5)  # nor a watch cache
        finally:
            operator.process.send_signal(signal.SIGCONT)

        wait_ready(kube, "heir", namespace, reason="Reconciled")
        eventually(lambda: equal(pool_replicas(kube, namespace), plan_at(68)), timeout=60)
        # no history and no cache to replay the deletion from: the LIST comparison found it
        assert f"[{namespace}/first] Gone from the API server" in operator.log()
    finally:
        operator.stop()
        print(f"--- operator log (tail) ---\n{operator.log()[-12000:]}")


def _reconciles(operator: OperatorProcess, name: str) -> int:
    return operator.log().count(f"/{name}] Reconciled (")
