"""Two operator replicas on one control plane: one writer, a takeover within 15 s, no stale write.

Who wrote what comes from the API server's own audit log (the control plane runs with one), each
replica's requests carrying its identity in the user agent.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.controlplane.harness import ControlPlane

from .kube import Kinds, Kube, eventually
from .operator_process import OperatorProcess
from .test_operator import SPEC, expected_replicas, make_pools, manifest, pool_replicas, wait_ready

pytestmark = pytest.mark.e2e
LEASE = "melange-operator"
TAKEOVER_LIMIT = 15.0


def _time(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _pool_writes(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Successful writes of a replica count: /scale patches, and the replicasPath JSON patch."""
    return [
        e
        for e in events
        if e["objectRef"].get("resource") != "leases"
        and (
            e["objectRef"].get("subresource") == "scale"
            or e["objectRef"].get("resource") == "nodepools"
        )
        and e["verb"] == "patch"
        and (e.get("responseStatus") or {}).get("code", 0) < 300
    ]


def _written_replicas(event: dict[str, Any]) -> int:
    body: Any = event["requestObject"]
    if isinstance(body, list):  # JSON Patch: the last op sets the value
        return int(body[-1]["value"])
    return int(body["spec"]["replicas"])


def _holder(kube: Kube, namespace: str) -> str | None:
    lease = kube.lease(LEASE, namespace)
    return None if lease is None else lease.get("holder_identity")


def _writes_after(events: Iterable[dict[str, Any]], since: float) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e["objectRef"].get("resource") != "leases" and _time(e["stageTimestamp"]) >= since
    ]


@pytest.fixture
def replicas(
    control_plane: ControlPlane, kube: Kube, namespace: str, tmp_path: Path
) -> Iterator[tuple[OperatorProcess, OperatorProcess]]:
    """op-a leading and op-b standing by, with the allocation "chat" Ready on its three pools."""
    make_pools(kube, namespace)
    a = OperatorProcess(control_plane, namespace, tmp_path, identity="op-a")
    b = OperatorProcess(control_plane, namespace, tmp_path, identity="op-b")
    try:
        a.start()
        eventually(lambda: _assert(_holder(kube, namespace) == "op-a"))
        b.start()
        kube.create(manifest("chat"), namespace)
        wait_ready(kube, "chat", namespace)
        yield a, b
    finally:
        a.stop()
        b.stop()


def test_the_standby_takes_over_mid_burst_and_ends_at_the_last_plan(
    kube: Kube, namespace: str, replicas: tuple[OperatorProcess, OperatorProcess]
) -> None:
    a, b = replicas
    assert b.writes() == []  # the standby has written nothing at all

    rates = [34 + 3 * k for k in range(1, 21)]
    killed = 0.0
    for k, rate in enumerate(rates):
        patch = {"spec": {"workload": {"totalRate": rate}}}
        kube.merge_patch(Kinds.allocation, "chat", namespace, patch)
        if k == 9:
            a.kill()
            killed = time.time()
        time.sleep(0.25)

    eventually(lambda: _assert(_holder(kube, namespace) == "op-b"), timeout=TAKEOVER_LIMIT + 5)
    lease = kube.lease(LEASE, namespace)
    assert lease is not None
    took = lease["acquire_time"].timestamp() - killed
    assert took <= TAKEOVER_LIMIT, f"the standby took over {took:.1f} s after the kill"

    final = copy.deepcopy(SPEC)
    final["workload"]["totalRate"] = rates[-1]
    eventually(lambda: _assert(pool_replicas(kube, namespace) == expected_replicas(final)))
    generation = kube.allocation("chat", namespace)["metadata"]["generation"]
    eventually(
        lambda: _assert(
            kube.allocation("chat", namespace)["status"]["observedGeneration"] == generation
        )
    )
    wait_ready(kube, "chat", namespace)

    # a wrote nothing after its death; b wrote nothing before it held the Lease
    assert _writes_after(a.writes(), killed) == []
    acquired = lease["acquire_time"].timestamp()
    early = [e for e in b.writes() if e["objectRef"].get("resource") != "leases"]
    assert all(_time(e["stageTimestamp"]) >= acquired - 1.0 for e in early)
    # nothing patched twice: no pool was written the count it had just been written
    writes = sorted(_pool_writes([*a.writes(), *b.writes()]), key=lambda e: e["stageTimestamp"])
    last: dict[str, int] = {}
    for event in writes:
        target = f"{event['objectRef']['resource']}/{event['objectRef']['name']}"
        value = _written_replicas(event)
        assert last.get(target) != value, f"{target} patched to {value} twice in a row"
        last[target] = value


def test_a_paused_leader_writes_nothing_after_losing_the_lease(
    kube: Kube, namespace: str, replicas: tuple[OperatorProcess, OperatorProcess]
) -> None:
    a, _ = replicas
    # the first reconcile's Events are posted after its status (which the fixture waited for):
    # pause only once they are done, or one in flight lands after the pause
    eventually(lambda: _assert(_quiet_for(a, 1.5)), timeout=20)

    a.pause()  # a stalled process: it cannot renew, and it does not know
    paused = time.time()
    eventually(lambda: _assert(_holder(kube, namespace) == "op-b"), timeout=TAKEOVER_LIMIT + 5)
    doubled = copy.deepcopy(SPEC)
    doubled["workload"]["totalRate"] = 68
    kube.merge_patch(Kinds.allocation, "chat", namespace, {"spec": {"workload": {"totalRate": 68}}})
    eventually(lambda: _assert(pool_replicas(kube, namespace) == expected_replicas(doubled)))

    a.resume()  # wakes up with a plan, a status and Events it would have written
    eventually(lambda: _assert("no longer holds the Lease" in a.log()), timeout=20)
    time.sleep(3)  # its controller ticks at least twice more
    assert _writes_after(a.writes(), paused) == []
    assert pool_replicas(kube, namespace) == expected_replicas(doubled)
    assert _holder(kube, namespace) == "op-b"


def _assert(value: bool) -> None:
    assert value


def _quiet_for(operator: OperatorProcess, seconds: float) -> bool:
    """No write but the Lease's for `seconds`."""
    writes = _writes_after(operator.writes(), 0.0)
    return not writes or time.time() - max(_time(w["stageTimestamp"]) for w in writes) >= seconds
