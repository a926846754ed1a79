"""What the controller knows of each allocation between reconciles, and what one reconcile builds.

Seeded from the stored status at first sight (a restart or a new leader resumes from the cluster),
then kept in memory by the one writer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from melange import api
from melange.api import conditions
from melange.api.conditions import Condition
from melange.plan.result import Plan
from melange.signals import rates

if TYPE_CHECKING:  # choose imports the solver; the state only names its result
    from melange.controller.choose import Choice

Key = tuple[str, str]  # (namespace, name)


class Kube(Protocol):
    """What the controller needs of the Kubernetes client (`controller.kube.client.KubeClient`)."""

    def list_allocations(self, namespaces: Collection[str]) -> set[tuple[str, str, str]]: ...

    def scope(self, ref: api.ObjectReference) -> tuple[str, bool]: ...

    def read_replicas(
        self,
        namespace: str | None,
        ref: api.ObjectReference,
        replicas_path: str | None,
        ready_path: str | None = None,
    ) -> Any: ...

    def ensure_replicas(
        self,
        namespace: str | None,
        ref: api.ObjectReference,
        replicas_path: str | None,
        desired: int,
        known: Any = None,
    ) -> Any: ...

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None: ...

    def post_event(
        self, namespace: str, name: str, uid: str | None, type_: str, reason: str, message: str
    ) -> None: ...

    def price(self, namespace: str, ref: api.SecretKeyRef) -> str: ...

    def publish_routing(
        self, namespace: str, name: str, owner: Mapping[str, Any], key: str, text: str
    ) -> bool: ...

    def unpublish_routing(self, namespace: str, name: str, owner_uid: str) -> None: ...

    def credentials(
        self, namespace: str, source: api.PrometheusSource
    ) -> tuple[str | None, str | None]: ...


@dataclass(frozen=True)
class EventSpec:
    type: str  # Normal | Warning
    reason: str
    message: str


def condition_event(condition: Condition) -> EventSpec:
    kind = "Normal" if condition.status == "True" else "Warning"
    return EventSpec(kind, condition.reason, condition.message[:1024])


@dataclass
class RateState:
    """What the operator knows of one allocation's rate; seeded from its status at first sight."""

    history: list[rates.RateSample] = field(default_factory=list)
    solved_rate: float | None = None  # the rate the current plan was solved for
    observed_before: bool = False  # any observation yet (else the plan follows spec.totalRate)
    condition: Condition | None = None  # the current RateObserved
    solved_distribution: list[list[float]] | None = None  # None: the spec's own
    distribution_condition: Condition | None = None  # the current DistributionObserved
    # The run of consecutive good observations: when it began (None after a gap) and the latest
    # of them. Both are in the status, so a restart or a new leader tells its own downtime from a
    # gap: the first observation after it continues the run only if it follows the last in time.
    observed_since: datetime | None = None
    last_observed: datetime | None = None
    activation: float | None = None  # what rateSource.prometheus.activationQuery last read

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> RateState:
        solved = status.get("solvedRate")
        matrix = status.get("solvedDistribution")
        return cls(
            history=rates.history_from_status(status.get("rateHistory")),
            solved_rate=float(solved) if isinstance(solved, int | float) else None,
            observed_before=status.get("lastObservationTime") is not None,
            observed_since=rates.parse_time(status.get("observedSince")),
            last_observed=rates.parse_time(status.get("lastObservationTime")),
            condition=stored_condition(status, conditions.RATE_OBSERVED),
            solved_distribution=matrix if isinstance(matrix, list) else None,
            distribution_condition=stored_condition(status, conditions.DISTRIBUTION_OBSERVED),
        )

    def plan_rate(self) -> float | None:
        """The rate to solve for: the decided one, once there was an observation."""
        return self.solved_rate if self.observed_before else None


def stored_condition(status: Mapping[str, Any], kind: str) -> Condition | None:
    found = conditions.find(status.get("conditions"), kind)
    if found is None or found.get("status") not in {"True", "False", "Unknown"}:
        return None
    return Condition(
        kind, found["status"], str(found.get("reason", "")), str(found.get("message", ""))
    )


def transitioned(before: Condition | None, after: Condition) -> bool:
    return before is None or (before.status, before.reason) != (after.status, after.reason)


@dataclass
class AllocationState:
    uid: str | None
    status: dict[str, Any]  # the status as last written by this replica (seeded from the stored)
    rate: RateState
    generation: int = 0  # the spec generation last reconciled
    next_poll: float = 0.0
    next_resync: float = 0.0
    polled_source: Any = None
    # ((generation, rate, distribution, caps) it was solved for, the plan)
    solved: tuple[tuple[Any, ...], Plan] | None = None
    choice: Choice | None = None  # the last choice: why the plan acted on is what it is
    prices_condition: Condition | None = None  # the current PricesObserved
    routing_document: str | None = None  # the routing table of the plan in `solved`, as JSON
    task: asyncio.Task[None] | None = None


@dataclass
class Work:
    """What one reconcile builds up: the status fields to write and the Events to post."""

    status: dict[str, Any]
    events: list[EventSpec] = field(default_factory=list)
    updates: list[Condition] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
