"""The controller acts only on a whole view: not before the watch has shown every allocation a
LIST shows.

A stand-in for the API server is used here, which the standards allow for a fault a real part
cannot be made to show: a real API server's watch delivers a handful of allocations faster than a
reconcile reaches its ownership check, so a watch that lags its LIST cannot be provoked on
demand. (tests/e2e/test_ownership.py starts a real operator on allocations made before it.)
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable, Collection
from typing import Any

import pytest

from melange.controller import loop
from melange.controller.loop import Controller
from melange.controller.settings import Settings

from .test_reconcile_failure import KEY, UID, FailingKube, body

LATER = (KEY[0], "later")
LATER_UID = "9d3c0c53-5f6a-4d0e-8d1c-3a4f5e6b7c8d"


class ListingKube(FailingKube):
    """What a LIST of the allocations shows (or raises), as the watch may not have shown it yet."""

    def __init__(self, listed: set[tuple[str, str, str]]) -> None:
        super().__init__()
        self.listed = listed
        self.list_error: Exception | None = None
        self.during_list: Callable[[], None] | None = None
        self.lists = 0

    def list_allocations(self, namespaces: Collection[str]) -> set[tuple[str, str, str]]:
        self.lists += 1
        if self.list_error is not None:
            raise self.list_error
        answer = set(self.listed)
        if self.during_list is not None:  # something happens while the LIST is under way
            self.during_list()
            self.during_list = None
        return answer


def later_body() -> dict[str, Any]:
    later = copy.deepcopy(body())
    later["uid"], later["created"] = LATER_UID, "2026-01-01T00:00:05Z"
    return later


async def eventually(condition: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "not within the deadline"
        await asyncio.sleep(0.05)


async def run_until_synced(kube: ListingKube, controller: Controller) -> list[bool]:
    """Observe the later allocation only, then the first: whether states existed before that."""
    seen_before: list[bool] = []
    controller.observe(LATER, later_body())
    controller.start()
    try:
        await eventually(lambda: kube.lists >= 3)  # several comparisons with the LIST
        seen_before.append(controller.synced)
        seen_before.append(bool(controller.states))
        controller.observe(KEY, body())
        await eventually(lambda: controller.synced and len(controller.states) == 2)
        return seen_before
    finally:
        await controller.stop()


def test_nothing_is_reconciled_until_the_watch_shows_every_listed_allocation() -> None:
    kube = ListingKube({(*KEY, UID), (*LATER, LATER_UID)})
    synced: list[bool] = []
    controller = Controller(kube, lambda: True)
    controller.on_synced = lambda: synced.append(True)
    before = asyncio.run(run_until_synced(kube, controller))
    assert before == [False, False]  # leading, one allocation seen: still nothing started
    assert synced == [True]  # the readiness callback, once


def test_an_allocation_deleted_before_the_watch_saw_it_does_not_hold_the_start() -> None:
    kube = ListingKube({(*KEY, UID), (*LATER, LATER_UID)})
    controller = Controller(kube, lambda: True)

    async def scenario() -> None:
        controller.start()
        try:
            controller.observe(KEY, body())
            await eventually(lambda: kube.lists >= 2)
            assert not controller.synced
            kube.listed = {(*KEY, UID)}  # "later" is gone before its watch event came
            await eventually(lambda: controller.synced)
        finally:
            await controller.stop()

    asyncio.run(scenario())


def test_a_list_that_fails_is_tried_again_and_nothing_acts_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loop, "SYNC_INTERVAL_SECONDS", 0.05)  # the back-off's first step
    kube = ListingKube({(*KEY, UID)})
    kube.list_error = RuntimeError("connection refused")
    controller = Controller(kube, lambda: True)

    async def scenario() -> None:
        controller.observe(KEY, body())
        controller.start()
        try:
            await eventually(lambda: kube.lists >= 3)
            assert not controller.synced
            assert not controller.states
            kube.list_error = None
            await eventually(lambda: controller.synced and bool(controller.states))
        finally:
            await controller.stop()

    asyncio.run(scenario())


def test_a_recreated_allocation_counts_only_when_the_watch_shows_the_new_one() -> None:
    kube = ListingKube({(*KEY, "a-new-uid")})
    controller = Controller(kube, lambda: True)

    async def scenario() -> None:
        controller.observe(KEY, body())  # the old object (UID), deleted and created again
        controller.start()
        try:
            await eventually(lambda: kube.lists >= 3)
            assert not controller.synced
            controller.observe(KEY, {**body(), "uid": "a-new-uid"})
            await eventually(lambda: controller.synced)
        finally:
            await controller.stop()

    asyncio.run(scenario())


def test_an_allocation_the_list_no_longer_shows_is_forgotten() -> None:
    """A deletion in a gap of the watch (it lists again, and shows no DELETED event)."""
    kube = ListingKube({(*KEY, UID), (*LATER, LATER_UID)})
    controller = Controller(kube, lambda: False, Settings(resync_seconds=0.1))

    async def scenario() -> None:
        controller.observe(KEY, body())
        controller.observe(LATER, later_body())
        controller.start()
        try:
            await eventually(lambda: controller.synced)
            lists = kube.lists
            await eventually(lambda: kube.lists >= lists + 2)
            assert set(controller.bodies) == {KEY, LATER}  # both still there: both listed
            kube.listed = {(*KEY, UID)}  # LATER deleted, and the watch never said so
            await eventually(lambda: LATER not in controller.bodies)
            assert KEY in controller.bodies
        finally:
            await controller.stop()

    asyncio.run(scenario())


def test_an_allocation_seen_while_the_list_is_under_way_is_kept() -> None:
    """Created after the LIST's snapshot, seen on the watch before the LIST answers: not gone."""
    kube = ListingKube({(*KEY, UID)})
    controller = Controller(kube, lambda: False, Settings(resync_seconds=0.1))

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        controller.observe(KEY, body())
        controller.start()
        try:
            await eventually(lambda: controller.synced)

            def created_meanwhile() -> None:
                kube.listed.add((*LATER, LATER_UID))  # in every later LIST
                loop.call_soon_threadsafe(controller.observe, LATER, later_body())

            lists = kube.lists
            kube.during_list = created_meanwhile
            await eventually(lambda: kube.lists >= lists + 3)
            assert set(controller.bodies) == {KEY, LATER}
        finally:
            await controller.stop()

    asyncio.run(scenario())
