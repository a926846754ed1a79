"""Leader election against the real API server's Lease, two electors in one process (short timings)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from melange.controller.kube.client import KubeClient, new_api_client
from melange.controller.lease import LeaderElector, LeaseRecord, LeaseTiming
from tests.controlplane.harness import ControlPlane

pytestmark = pytest.mark.e2e

TIMING = LeaseTiming(duration=2.0, renew_deadline=1.2, retry=0.3)


def elector(control_plane: ControlPlane, namespace: str, identity: str) -> LeaderElector:
    kube = KubeClient(new_api_client(str(control_plane.kubeconfig_path)), identity)
    return LeaderElector(kube, namespace, "melange-operator", identity, TIMING)


async def until(probe: object, timeout: float) -> float:
    """Seconds until `probe()` is true (fails after `timeout`)."""
    started = time.monotonic()
    while not probe():  # type: ignore[operator]
        assert time.monotonic() - started < timeout, "not reached in time"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def leader_and_standby(
    control_plane: ControlPlane, namespace: str
) -> tuple[LeaderElector, LeaderElector]:
    """ "a" leading, then "b" started."""
    a, b = elector(control_plane, namespace, "a"), elector(control_plane, namespace, "b")
    a.start()
    await until(a.leading, 10)
    b.start()
    return a, b


def test_one_leader_then_takeover_after_the_lease_stood_still(
    control_plane: ControlPlane, namespace: str
) -> None:
    async def scenario() -> None:
        a, b = await leader_and_standby(control_plane, namespace)
        await asyncio.sleep(3 * TIMING.duration)
        assert a.leading()  # a renews ...
        assert not b.leading()  # ... so b never takes it
        # a dies without releasing: its loop stops, the Lease stands still
        assert a._task is not None
        a._task.cancel()
        died = time.monotonic()
        await until(lambda: not a.leading(), TIMING.renew_deadline + 0.5)
        stopped_writing = time.monotonic()
        await until(b.leading, TIMING.duration + 3 * TIMING.retry + 1)
        b_leads = time.monotonic()
        # a stopped writing before b started: never two writers
        assert stopped_writing - died <= TIMING.renew_deadline + 0.5
        assert b_leads - stopped_writing >= TIMING.duration - TIMING.renew_deadline - 0.2
        record = await asyncio.to_thread(b.store.read_lease, namespace, "melange-operator")
        assert record is not None
        assert (record.holder, record.transitions) == ("b", 1)
        await b.stop()

    asyncio.run(scenario())


def test_a_released_lease_is_taken_at_the_next_round(
    control_plane: ControlPlane, namespace: str
) -> None:
    async def scenario() -> None:
        a, b = await leader_and_standby(control_plane, namespace)
        await asyncio.sleep(2 * TIMING.retry)
        await a.stop()  # releases
        assert not a.leading()
        taken = await until(b.leading, TIMING.duration)
        assert taken < TIMING.duration  # without waiting for the Lease to expire
        await b.stop()

    asyncio.run(scenario())


class HeldWrites:
    """The real Lease store, whose next write can be held in flight. A stand-in for a slow API
    server answer, which the real one cannot be made to give on demand."""

    def __init__(self, inner: KubeClient) -> None:
        self.inner = inner
        self.hold_next = False
        self.held = threading.Event()  # a write is waiting
        self.go = threading.Event()  # it may go on
        self.landed = threading.Event()  # it was answered

    def read_lease(self, namespace: str, name: str) -> LeaseRecord | None:
        if self.held.is_set():  # a read meanwhile sees the held write's outcome
            self.landed.wait(10)
        return self.inner.read_lease(namespace, name)

    def write_lease(self, *args: Any) -> bool:
        if not self.hold_next:
            return self.inner.write_lease(*args)
        self.hold_next = False
        self.held.set()
        self.go.wait(10)
        try:
            return self.inner.write_lease(*args)
        finally:
            self.landed.set()


def test_a_renewal_in_flight_when_stopping_lands_before_the_release(
    control_plane: ControlPlane, namespace: str
) -> None:
    """Cancelling the election does not stop a round already in its thread: stopping waits for
    it, so the replica does not lead again afterwards and its release is not refused."""

    async def scenario() -> None:
        store = HeldWrites(KubeClient(new_api_client(str(control_plane.kubeconfig_path)), "a"))
        a = LeaderElector(store, namespace, "melange-operator", "a", TIMING)
        a.start()
        await until(a.leading, 10)
        store.hold_next = True
        await until(store.held.is_set, 5)  # a renewal is in flight
        stopping = asyncio.create_task(a.stop())
        await asyncio.sleep(0.3)
        store.go.set()  # it lands now, after the stop began
        await stopping
        await asyncio.sleep(2 * TIMING.retry)
        assert not a.leading()
        record = store.read_lease(namespace, "melange-operator")
        assert record is not None
        assert record.holder is None  # released

    asyncio.run(scenario())
