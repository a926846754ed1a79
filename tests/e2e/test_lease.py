"""Leader election against the real API server's Lease, two electors in one process (short timings)."""

from __future__ import annotations

import asyncio
import time

import pytest

from melange.controller.kube.client import KubeClient, new_api_client
from melange.controller.lease import LeaderElector, LeaseTiming
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
