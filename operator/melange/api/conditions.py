"""Status conditions in the `metav1.Condition` shape, set the way Kubernetes controllers set them.

A condition's `lastTransitionTime` moves only when its status changes, so `kubectl describe` tells
how long something has been true; `observedGeneration` says which spec the verdict is about.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

Status = Literal["True", "False", "Unknown"]

READY = "Ready"
SOLVED = "Solved"
SCALED = "Scaled"
RATE_OBSERVED = "RateObserved"
DISTRIBUTION_OBSERVED = "DistributionObserved"
TRANSITIONING = "Transitioning"
CAPACITY_LIMITED = "CapacityLimited"
BUDGET_LIMITED = "BudgetLimited"
PRICES_OBSERVED = "PricesObserved"
ROUTING_PUBLISHED = "RoutingPublished"
ORDER = (
    READY,
    SOLVED,
    SCALED,
    TRANSITIONING,
    CAPACITY_LIMITED,
    BUDGET_LIMITED,
    RATE_OBSERVED,
    DISTRIBUTION_OBSERVED,
    PRICES_OBSERVED,
    ROUTING_PUBLISHED,
)


@dataclass(frozen=True)
class Condition:
    type: str
    status: Status
    reason: str  # one CamelCase word, no hyphens (the API server's pattern)
    message: str


def timestamp(now: datetime) -> str:
    """RFC 3339 in UTC with second precision, as the API server stores `date-time` fields."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_conditions(
    existing: Iterable[Mapping[str, Any]] | None,
    updates: Sequence[Condition],
    generation: int,
    now: datetime,
) -> list[dict[str, Any]]:
    """The full list (a merge patch replaces lists whole), with `updates` applied in a fixed order."""
    by_type = {c["type"]: dict(c) for c in existing or () if isinstance(c, Mapping) and "type" in c}
    for update in updates:
        old = by_type.get(update.type)
        changed = old is None or old.get("status") != update.status
        by_type[update.type] = {
            "type": update.type,
            "status": update.status,
            "observedGeneration": generation,
            "lastTransitionTime": timestamp(now)
            if changed or old is None
            else old.get("lastTransitionTime", timestamp(now)),
            "reason": update.reason,
            "message": update.message[:32768],
        }
    rank = {name: k for k, name in enumerate(ORDER)}
    return sorted(by_type.values(), key=lambda c: (rank.get(c["type"], len(ORDER)), c["type"]))


def find(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    for condition in conditions or ():
        if isinstance(condition, Mapping) and condition.get("type") == type_:
            return condition
    return None


def transitioned(before: Iterable[Mapping[str, Any]] | None, after: Condition) -> bool:
    """Whether a condition changed its status or reason: the moments worth an Event."""
    old = find(before, after.type)
    return old is None or old.get("status") != after.status or old.get("reason") != after.reason
