"""Ownership decisions: who owns a target, when a pool is patched, what status remembers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from melange.api.conditions import Condition
from melange.controller import decide
from melange.controller.decide import Claim, PoolRecord, ScaleOutcome
from melange.controller.lease import LeaseRecord, Observed, may_take

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
POOL = ("team-a", "apps", "Deployment", "pool-l4")
TARGET = "Deployment/pool-l4"


def claim(name: str, created: str, *targets: decide.TargetKey, namespace: str = "team-a") -> Claim:
    return Claim((namespace, name), created, targets)


def conflicts(mine: Claim, claims: list[Claim]) -> list[tuple[decide.TargetKey, tuple[str, str]]]:
    """What the ownership check finds for `mine` among `claims` (an index of them)."""
    return decide.ClaimIndex.of(claims).conflicts(mine)


def test_the_earliest_allocation_owns_a_target_whatever_the_order_seen() -> None:
    first = claim("first", "2026-01-01T00:00:00Z", POOL)
    later = claim("later", "2026-01-01T00:00:05Z", POOL)
    assert conflicts(later, [first, later]) == [(POOL, ("team-a", "first"))]
    assert conflicts(later, [later, first]) == [(POOL, ("team-a", "first"))]
    assert conflicts(first, [later, first]) == []


def test_same_creation_time_is_decided_by_namespace_then_name() -> None:
    a = claim("a", "2026-01-01T00:00:00Z", POOL)
    b = claim("b", "2026-01-01T00:00:00Z", POOL)
    assert conflicts(b, [a]) == [(POOL, ("team-a", "a"))]
    assert conflicts(a, [b]) == []


def test_a_cluster_scoped_target_is_shared_across_namespaces() -> None:
    nodepool = ("", "karpenter.sh", "NodePool", "gpu-h100")
    mine = claim("chat", "2026-01-01T00:00:09Z", nodepool, namespace="team-b")
    other = claim("chat", "2026-01-01T00:00:01Z", nodepool, namespace="team-a")
    found = conflicts(mine, [other])
    assert found == [(nodepool, ("team-a", "chat"))]
    message = decide.conflict_condition(found).message
    assert message.startswith("NodePool/gpu-h100 (cluster-scoped) belongs to MelangeAllocation")


def test_different_targets_do_not_conflict() -> None:
    other = ("team-a", "apps", "Deployment", "pool-a100")
    assert (
        conflicts(
            claim("b", "2026-01-02T00:00:00Z", POOL), [claim("a", "2026-01-01T00:00:00Z", other)]
        )
        == []
    )


TARGETS = [("team-a", "apps", "Deployment", f"pool-{k}") for k in range(4)]
CLAIMS = st.lists(
    st.builds(
        claim,
        st.sampled_from(["a", "b", "c", "d", "e"]),
        st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z", "2026-01-01T00:00:02Z"]),
    ).flatmap(
        lambda c: st.lists(st.sampled_from(TARGETS), max_size=3).map(
            lambda targets: Claim(c.allocation, c.created, tuple(targets))
        )
    ),
    max_size=6,
    unique_by=lambda c: c.allocation,
)


@given(CLAIMS)
def test_the_index_finds_for_each_allocation_the_earliest_other_claimant(
    claims: list[Claim],
) -> None:
    """Built once from every claim (its own included), the index gives each allocation what a
    scan of all the others gives: per target, the earliest other claimant when it ranks first."""
    index = decide.ClaimIndex.of(claims)
    for mine in claims:
        expected = []
        for target in dict.fromkeys(mine.targets):
            others = [
                (c.created, c.allocation) for c in claims if c != mine and target in c.targets
            ]
            if others and min(others) < (mine.created, mine.allocation):
                expected.append((target, min(others)[1]))
        assert index.conflicts(mine) == expected


@pytest.mark.parametrize(
    ("current", "desired", "record", "policy", "expected"),
    [
        # first sight: whatever the pool holds, it is brought to the plan
        (1, 3, None, "Enforce", decide.PoolAction(True, False, "RateDrift")),
        (1, 3, None, "Observe", decide.PoolAction(True, False, "RateDrift")),
        # at the plan: nothing to do, whoever set it
        (3, 3, PoolRecord(TARGET, 3, 5), "Enforce", decide.PoolAction(False, False, "")),
        # the plan moved, the pool did not: patched for the trigger's reason
        (3, 4, PoolRecord(TARGET, 3, 3), "Enforce", decide.PoolAction(True, False, "RateDrift")),
        # someone else moved it: set back (Enforce), reported only (Observe)
        (5, 3, PoolRecord(TARGET, 3, 3), "Enforce", decide.PoolAction(True, True, "OutsideChange")),
        (
            5,
            3,
            PoolRecord(TARGET, 3, 3),
            "Observe",
            decide.PoolAction(False, True, "OutsideChange"),
        ),
        # Observe, seen before at 5: not reported again, still left
        (
            5,
            3,
            PoolRecord(TARGET, 3, 5),
            "Observe",
            decide.PoolAction(False, False, "OutsideChange"),
        ),
        # Observe, and the plan asks for a new count: applied
        (5, 4, PoolRecord(TARGET, 3, 5), "Observe", decide.PoolAction(True, False, "RateDrift")),
        # a record of another target says nothing about this one
        (
            5,
            3,
            PoolRecord("Deployment/other", 3, 3),
            "Enforce",
            decide.PoolAction(True, False, "RateDrift"),
        ),
    ],
)
def test_pool_action(
    current: int, desired: int, record: PoolRecord | None, policy: str, expected: decide.PoolAction
) -> None:
    assert decide.pool_action(current, desired, record, policy, TARGET, "RateDrift") == expected


def test_pool_records_round_trip_through_status_and_skip_malformed_entries() -> None:
    records = {"L4": PoolRecord(TARGET, 3, 5), "A100": PoolRecord("MachineDeployment/a", 1, 1)}
    status = {"targets": decide.targets_status(records, {"L4": "Observe"})}
    assert status["targets"][0] == {
        "name": "L4",
        "target": TARGET,
        "policy": "Observe",
        "desiredReplicas": 3,
        "observedReplicas": 5,
    }
    assert decide.pool_records(status) == records
    broken = {"targets": [{"name": "L4"}, "x", {"name": 3, "target": TARGET}]}
    assert decide.pool_records(broken) == {}


def test_recent_patches_newest_first_with_reasons_and_bounded() -> None:
    before = [{"time": "old", "name": "L4", "to": n} for n in range(decide.RECENT_PATCHES)]
    outcomes = [
        ScaleOutcome("L4", TARGET, 4, previous=3, patched=True),
        ScaleOutcome("A100", "MachineDeployment/a", 1, previous=1, patched=False),
    ]
    entries = decide.recent_patches(before, outcomes, {"L4": "OutsideChange"}, T0)
    assert len(entries) == decide.RECENT_PATCHES
    assert entries[0] == {
        "time": "2026-01-02T03:04:05Z",
        "name": "L4",
        "target": TARGET,
        "from": 3,
        "to": 4,
        "reason": "OutsideChange",
    }
    assert entries[1] == before[0]


def test_ready_is_derived_from_solved_and_scaled() -> None:
    solved = Condition("Solved", "True", "Optimal", "optimal")
    conflict = decide.conflict_condition([(POOL, ("team-a", "first"))])
    ready = decide.with_ready([solved, conflict])[0]
    assert (ready.type, ready.status, ready.reason) == ("Ready", "False", "TargetConflict")
    assert ready.message == conflict.message
    ok = Condition("Scaled", "True", "Scaled", "node pools match the plan: L4=3")
    assert decide.with_ready([solved, ok])[0] == Condition(
        "Ready", "True", "Reconciled", "node pools match the plan: L4=3"
    )
    unsolved = Condition("Solved", "False", "Infeasible", "no type serves bucket (1, 1)")
    assert decide.with_ready([unsolved, ok])[0].reason == "Infeasible"


def test_an_observed_outside_change_is_named_in_the_message() -> None:
    outcome = ScaleOutcome("L4", TARGET, 3, previous=5)
    text = decide.outside_change_message(outcome, 5, PoolRecord(TARGET, 3, 3), kept=False)
    assert text == f"{TARGET} (L4) was changed from 3 to 5 by another writer; set back to 3"
    kept = decide.outside_change_message(outcome, 5, PoolRecord(TARGET, 3, 3), kept=True)
    assert kept.endswith("policy Observe: left at 5 (the plan says 3)")


def lease(holder: str | None, renew: str | None) -> LeaseRecord:
    return LeaseRecord(holder, renew, 8, 0, None, "1")


def test_a_standby_takes_the_lease_only_after_it_stood_still_for_its_duration() -> None:
    assert may_take(None, None, 0.0, 8.0)
    assert may_take(lease(None, None), None, 0.0, 8.0)  # released
    held = lease("a", "t1")
    assert not may_take(held, None, 100.0, 8.0)  # first sight: the holder may be alive
    seen = Observed("a", "t1", 10.0)
    assert not may_take(held, seen, 17.9, 8.0)
    assert may_take(held, seen, 18.0, 8.0)
    assert not may_take(lease("a", "t2"), seen, 30.0, 8.0)  # renewed since: alive
