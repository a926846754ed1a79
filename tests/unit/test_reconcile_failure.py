"""A reconcile that fails unexpectedly is reported, not only logged: Ready=False with reason
InternalError in the status (through the controller's one status write), one Warning Event per
transition, the error counted, and the retry after SCALE_RETRY_SECONDS.

The Kubernetes client here is a stand-in whose `read_replicas` raises an exception the real client
never lets through on purpose (it turns every API error into a ScaleError): an unexpected failure,
a defect, is the fault a real API server cannot be made to show on demand. Everything else (the
controller, the spec's validation, the solver, the conditions) is the real code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from typing import Any

from melange import api
from melange.api import conditions
from melange.controller import metrics
from melange.controller.loop import (
    MAX_ERROR_MESSAGE,
    SCALE_RETRY_SECONDS,
    Controller,
    failure_message,
)
from melange.controller.state import AllocationState, RateState

KEY = ("serving", "chat")
UID = "0b6c1f8e-1d2a-4f51-9f7e-2f4a3c5d6e7f"


class FailingKube:
    """Answers what a reconcile asks before it reads a pool; reading a pool raises."""

    def __init__(self, status_fails: bool = False) -> None:
        self.status_fails = status_fails
        self.patches: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []

    def list_allocations(self, namespaces: Collection[str]) -> set[tuple[str, str, str]]:
        raise AssertionError("these tests reconcile directly, not through the controller's loop")

    def scope(self, ref: api.ObjectReference) -> tuple[str, bool]:
        return "deployments.apps", True

    def read_replicas(
        self,
        namespace: str | None,
        ref: api.ObjectReference,
        replicas_path: str | None,
        ready_path: str | None = None,
    ) -> Any:
        raise RuntimeError("the connection pool was closed\nwhile reading " + "x" * 400)

    def price(self, namespace: str, ref: api.SecretKeyRef) -> str:
        raise AssertionError("no price source in these specs")

    def ensure_replicas(
        self,
        namespace: str | None,
        ref: api.ObjectReference,
        replicas_path: str | None,
        desired: int,
        known: Any = None,
    ) -> Any:
        raise AssertionError("no pool is patched: the read failed")

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        if self.status_fails:
            raise RuntimeError("the status write failed too")
        self.patches.append(dict(status))

    def post_event(
        self, namespace: str, name: str, uid: str | None, type_: str, reason: str, message: str
    ) -> None:
        self.events.append((type_, reason, message))

    def credentials(
        self, namespace: str, source: api.PrometheusSource
    ) -> tuple[str | None, str | None]:
        return None, None

    def publish_routing(
        self, namespace: str, name: str, owner: Mapping[str, Any], key: str, text: str
    ) -> bool:
        raise AssertionError("these specs publish no routing table")

    def unpublish_routing(self, namespace: str, name: str, owner_uid: str) -> None:
        raise AssertionError("these specs published no routing table")


def body() -> dict[str, Any]:
    return {
        "uid": UID,
        "generation": 1,
        "created": "2026-01-01T00:00:00Z",
        "spec": {
            "buckets": {"inputTokens": [1, 100, 1000], "outputTokens": [1, 100]},
            "workload": {"distribution": [[3], [1]], "totalRate": 10},
            "gpus": [
                {
                    "name": "L4",
                    "costPerHour": 0.7,
                    "throughput": [[20], [8]],
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "l4"},
                }
            ],
        },
        "status": {},
    }


def errors_counted() -> float:
    value = metrics.REGISTRY.get_sample_value(
        "melange_errors_total",
        {"namespace": KEY[0], "allocation": KEY[1], "reason": "InternalError"},
    )
    return value or 0.0


async def reconcile_twice(kube: FailingKube) -> tuple[AllocationState, float]:
    controller = Controller(kube, lambda: True)
    controller.observe(KEY, body())
    state = AllocationState(UID, {}, RateState())
    controller.states[KEY] = state
    try:
        await controller._guarded(KEY, state, "create", False)
        await controller._guarded(KEY, state, "resync", False)
        return state, asyncio.get_running_loop().time()
    finally:
        await controller.prometheus.close()


def test_a_failing_reconcile_sets_ready_false_and_warns_once() -> None:
    kube = FailingKube()
    before = errors_counted()
    state, now = asyncio.run(reconcile_twice(kube))

    assert kube.patches, "the failure was not written to the status"
    ready = conditions.find(kube.patches[0]["conditions"], conditions.READY)
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", "InternalError")
    assert ready["message"].startswith("RuntimeError: the connection pool was closed while")
    assert "\n" not in ready["message"]
    assert len(ready["message"]) <= MAX_ERROR_MESSAGE
    assert kube.patches[0]["observedGeneration"] == 1
    # the second failure changes nothing in the status, and posts no second Event
    assert len(kube.patches) == 1
    assert [e[:2] for e in kube.events] == [("Warning", "InternalError")]
    assert kube.events[0][2] == ready["message"]
    assert errors_counted() - before == 2
    # no hot loop: the next attempt waits, and the spec is not taken for a new one
    assert state.generation == 1
    assert now + SCALE_RETRY_SECONDS - 1 < state.next_resync <= now + SCALE_RETRY_SECONDS


def test_a_failing_status_write_is_logged_and_retried() -> None:
    kube = FailingKube(status_fails=True)
    state, now = asyncio.run(reconcile_twice(kube))
    assert kube.patches == []
    assert kube.events == []  # an Event about a status that was not written would mislead
    assert state.next_resync > now + SCALE_RETRY_SECONDS - 1


def test_failure_message_is_one_short_line() -> None:
    assert failure_message(OverflowError("math range error")) == "OverflowError: math range error"
    long = failure_message(ValueError("a\n" * 500))
    assert len(long) == MAX_ERROR_MESSAGE
    assert long.endswith("...")
    assert "\n" not in long
