"""Make-before-break, capacity in flight, step limits, capacity caps and churn (the pure parts)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from melange import api
from melange.controller import choose, decide
from melange.controller.transition import (
    Capacity,
    PoolReading,
    StepLimits,
    next_step,
    update_capacity,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_without_make_before_break_every_pool_goes_to_the_plan_at_once() -> None:
    pools = {"A": PoolReading(4, 4), "B": PoolReading(0, 0)}
    step = next_step({"A": 0, "B": 3}, pools, make_before_break=False)
    assert step.targets == {"A": 0, "B": 3}
    assert not step.held


def test_scale_down_waits_for_the_new_capacity_then_follows_it() -> None:
    planned = {"A": 0, "B": 3}
    first = next_step(
        planned, {"A": PoolReading(4, 4), "B": PoolReading(0, 0)}, make_before_break=True
    )
    assert first.targets == {"A": 4, "B": 3}
    assert first.held == ("A",)
    assert first.waiting == ("B",)
    # B asked for 3, two of them ready: A still waits
    partly = next_step(
        planned,
        {"A": PoolReading(4, 4), "B": PoolReading(3, 2)},
        make_before_break=True,
        waited_seconds=60,
        ready_timeout=600,
    )
    assert partly.targets == {"A": 4, "B": 3}
    ready = next_step(
        planned, {"A": PoolReading(4, 4), "B": PoolReading(3, 3)}, make_before_break=True
    )
    assert ready.targets == {"A": 0, "B": 3}
    assert not ready.in_progress


def test_scale_down_goes_ahead_after_the_ready_timeout() -> None:
    step = next_step(
        {"A": 0, "B": 3},
        {"A": PoolReading(4, 4), "B": PoolReading(3, 0)},
        make_before_break=True,
        waited_seconds=600,
        ready_timeout=600,
    )
    assert step.targets == {"A": 0, "B": 3}
    assert step.timed_out
    condition = decide.transition_condition(
        step, {"A": 0, "B": 3}, {"A": PoolReading(0, 0), "B": PoolReading(3, 0)}, 600
    )
    assert (condition.status, condition.reason) == ("True", "WaitingForReady")
    assert condition.message.startswith(
        "waiting for B to be ready; the scale-downs went ahead without them: they were not ready "
        "within 600 s (transition.readyTimeoutSeconds). "
    )


def test_a_target_without_a_ready_count_counts_as_ready() -> None:
    step = next_step(
        {"A": 0, "B": 3},
        {"A": PoolReading(4, None), "B": PoolReading(0, None)},
        make_before_break=True,
    )
    assert step.targets == {"A": 0, "B": 3}


def test_no_more_is_asked_of_a_type_whose_scale_up_is_in_flight() -> None:
    step = next_step({"B": 6}, {"B": PoolReading(3, 1)}, make_before_break=True)
    assert step.targets == {"B": 3}
    assert step.pending == ("B",)
    done = next_step({"B": 6}, {"B": PoolReading(3, 3)}, make_before_break=True)
    assert done.targets == {"B": 6}


def test_step_limits_move_one_step_per_interval() -> None:
    limits = {"B": StepLimits(max_up=2, max_down=1, last_scale=None)}
    pools = {"B": PoolReading(1, 1)}
    step = next_step({"B": 6}, pools, make_before_break=False, limits=limits, now=T0, interval=30)
    assert step.targets == {"B": 3}
    assert step.limited == ("B",)
    recent = {"B": StepLimits(max_up=2, last_scale=T0 - timedelta(seconds=10))}
    held = next_step(
        {"B": 6},
        {"B": PoolReading(3, 3)},
        make_before_break=False,
        limits=recent,
        now=T0,
        interval=30,
    )
    assert held.targets == {"B": 3}
    down = next_step(
        {"B": 0},
        {"B": PoolReading(3, 3)},
        make_before_break=False,
        limits=limits,
        now=T0,
        interval=30,
    )
    assert down.targets == {"B": 2}


@given(
    old=st.lists(st.integers(0, 6), min_size=2, max_size=4),
    new=st.lists(st.integers(0, 6), min_size=4, max_size=4),
    arrivals=st.lists(st.integers(0, 3), min_size=1, max_size=12),
)
def test_old_capacity_stays_until_the_new_is_ready(
    old: list[int], new: list[int], arrivals: list[int]
) -> None:
    """Sampled at every step: either every pool still holds its old count, or every pool that
    grows (or stays) is ready at its plan; so the ready fleet serves the old plan or the new."""
    names = [f"g{k}" for k in range(len(old))]
    planned = dict(zip(names, new, strict=False))
    current = dict(zip(names, old, strict=False))
    ready = dict(current)
    for arrived in arrivals:
        pools = {n: PoolReading(current[n], ready[n]) for n in names}
        step = next_step(planned, pools, make_before_break=True, ready_timeout=10**9)
        current = dict(step.targets)
        ready = {
            n: min(current[n], ready[n] + arrived) if current[n] > ready[n] else current[n]
            for n in names
        }
        keeps_old = all(current[n] >= old[k] for k, n in enumerate(names))
        new_ready = all(ready[n] >= planned[n] for n in names if planned[n] >= pools[n].current)
        assert keeps_old or new_ready, (pools, step)


def test_a_type_short_for_the_timeout_is_capped_then_retried() -> None:
    pools = {"H100": PoolReading(4, 1), "L4": PoolReading(2, 2)}
    first = update_capacity(Capacity(), pools, T0, timeout=300, retry=1800)
    assert first.capacity.short_since == {"H100": T0}
    assert not first.new_caps
    later = T0 + timedelta(seconds=300)
    capped = update_capacity(first.capacity, pools, later, timeout=300, retry=1800)
    assert capped.new_caps == ("H100",)
    assert capped.capacity.caps["H100"].replicas == 1
    held = update_capacity(capped.capacity, {**pools, "H100": PoolReading(1, 1)}, later, 300, 1800)
    assert held.capacity.caps["H100"].retry == later + timedelta(seconds=1800)
    retried = update_capacity(
        held.capacity, pools, later + timedelta(seconds=1800), timeout=300, retry=1800
    )
    assert retried.lifted == ("H100",)
    assert "H100" not in retried.capacity.caps
    assert "H100" not in retried.capacity.short_since  # a fresh timeout for the fresh ask


def test_no_cap_without_a_capacity_timeout() -> None:
    pools = {"H100": PoolReading(4, 0)}
    change = update_capacity(Capacity({"H100": T0}), pools, T0 + timedelta(days=1), None, 60)
    assert not change.capacity.caps


def test_caps_round_trip_through_the_status_and_lower_max_replicas() -> None:
    pools = {"H100": PoolReading(4, 1)}
    capped = update_capacity(Capacity({"H100": T0}), pools, T0 + timedelta(hours=1), 60, 600)
    status = {"gpuCaps": decide.caps_status(capped.capacity.caps)}
    assert decide.caps_from_status(status) == capped.capacity.caps
    spec = _spec(30.0)
    limited = decide.capped_spec(spec, {"B": capped.capacity.caps["H100"]})
    assert [g.max_replicas for g in limited.gpus] == [None, 1]


# -- churn ----------------------------------------------------------------------------------------


def _used(replicas: dict[str, int]) -> dict[str, int]:
    return {name: count for name, count in replicas.items() if count}


def _spec(rate: float, min_savings: float | None = None) -> api.AllocationSpec:
    """One bucket; B is the cheaper per request, A the finer grained."""
    raw: dict[str, Any] = {
        "buckets": {"inputTokens": [1, 100], "outputTokens": [1, 100]},
        "workload": {"distribution": [[1.0]], "totalRate": rate},
        "sliceFactor": 8,
        "gpus": [
            {"name": "A", "costPerHour": 1.0, "throughput": [[10.0]]},
            {"name": "B", "costPerHour": 3.0, "throughput": [[40.0]]},
        ],
    }
    if min_savings is not None:
        raw["minSavings"] = min_savings
    return api.validate_spec(raw)


def test_the_current_counts_are_kept_when_the_cheapest_plan_saves_too_little() -> None:
    spec = _spec(35.0, min_savings=0.5)
    now = choose.choose_plan(spec, 35.0).plan.replicas()
    assert _used(now) == {"B": 1}
    # at 9 req/s one A (1/h) would do, a saving of 67% of B's 3/h: more than 50%, so it moves
    moved = choose.choose_plan(spec, 9.0, current=now)
    assert _used(moved.plan.replicas()) == {"A": 1}
    assert moved.note is None
    # at 28 req/s three A (3/h) cost as much as one B: nothing to save, nothing moves
    kept = choose.choose_plan(spec, 28.0, current=now)
    assert _used(kept.plan.replicas()) == {"B": 1}
    assert kept.note is not None
    assert "current counts" in kept.note


def test_a_saving_below_min_savings_keeps_the_counts_and_says_feasible() -> None:
    spec = _spec(35.0, min_savings=0.7)
    kept = choose.choose_plan(spec, 9.0, current={"A": 0, "B": 1})
    assert _used(kept.plan.replicas()) == {"B": 1}
    assert kept.plan.status == "Feasible"  # dearer than the proven optimum: not Optimal
    best = choose.choose_plan(_spec(35.0), 9.0)
    assert kept.plan.lower_bound == best.plan.lower_bound


def test_without_min_savings_the_cheapest_plan_is_taken() -> None:
    spec = _spec(35.0)
    assert _used(choose.choose_plan(spec, 9.0, current={"B": 1}).plan.replicas()) == {"A": 1}


def test_more_traffic_than_the_counts_serve_resizes_the_current_mix() -> None:
    spec = _spec(35.0, min_savings=0.5)
    grown = choose.choose_plan(spec, 70.0, current={"A": 0, "B": 1})
    assert _used(grown.plan.replicas()) == {"B": 2}


def test_no_type_leaves_the_mix_for_a_saving_below_min_savings() -> None:
    """At 75 req/s two B (6/h) would do; the mix of A and B resized costs 7/h, 14% more."""
    running = {"A": 1, "B": 1}  # serves 50 req/s: too few for 75
    kept = choose.choose_plan(_spec(35.0, min_savings=0.3), 75.0, current=running)
    assert _used(kept.plan.replicas()) == {"A": 1, "B": 2}
    assert kept.note is not None
    assert "the current mix of types, resized" in kept.note
    moved = choose.choose_plan(_spec(35.0, min_savings=0.1), 75.0, current=running)
    assert _used(moved.plan.replicas()) == {"B": 2}


def test_a_plan_outside_the_caps_falls_back_to_the_full_counts() -> None:
    spec = _spec(35.0)
    caps = update_capacity(
        Capacity({"A": T0, "B": T0}),
        {"A": PoolReading(1, 0), "B": PoolReading(1, 0)},
        T0 + timedelta(hours=1),
        60,
        600,
    ).capacity.caps
    choice = choose.choose_plan(spec, 35.0, caps=caps)
    assert choice.plan.solved
    assert choice.note is not None
    assert "caps" in choice.note


# -- shared budgets -------------------------------------------------------------------------------


def test_a_plan_over_what_the_budget_leaves_is_solved_within_it() -> None:
    spec = _spec(80.0)
    free = choose.choose_plan(spec, 80.0, budgets={"B": 2})
    assert _used(free.plan.replicas()) == {"B": 2}
    assert free.over_budget == {}
    short = choose.choose_plan(spec, 80.0, budgets={"B": 1})
    assert _used(short.plan.replicas()) == {"A": 4, "B": 1}
    assert short.over_budget == {"B": (2, 1)}
    condition = decide.budget_condition(short.over_budget, {"B": 5})
    assert condition.status == "True"
    assert "the cluster budget of 5 leaves 1" in condition.message


def test_no_plan_within_the_budget_is_an_answer_with_the_reason() -> None:
    raw = _spec(80.0).model_dump(by_alias=True, exclude_none=True)
    raw["gpus"][0]["maxReplicas"] = 2
    spec = api.validate_spec(raw)
    choice = choose.choose_plan(spec, 80.0, budgets={"B": 0})
    assert not choice.plan.solved
    assert choice.plan.reason is not None
    assert "no plan fits within the cluster's GPU budgets (B has 0 left)" in choice.plan.reason


# -- priority -------------------------------------------------------------------------------------


def _twins(priorities: dict[str, int], **extra: Any) -> api.AllocationSpec:
    """Two pools of the same GPU at the same price (two zones, say), and a cheaper third type."""
    gpus = [
        {"name": name, "costPerHour": 2.0, "throughput": [[20.0]]} for name in ("zone-a", "zone-b")
    ]
    for gpu in gpus:
        if gpu["name"] in priorities:
            gpu["priority"] = priorities[gpu["name"]]
    gpus.append({"name": "spot", "costPerHour": 1.5, "throughput": [[20.0]], **extra})
    return api.validate_spec(
        {
            "buckets": {"inputTokens": [1, 100], "outputTokens": [1, 100]},
            "workload": {"distribution": [[1.0]], "totalRate": 50},
            "sliceFactor": 8,
            "gpus": gpus,
        }
    )


@pytest.mark.parametrize("preferred", ["zone-a", "zone-b"])
def test_priority_breaks_a_cost_tie(preferred: str) -> None:
    spec = _twins({preferred: 10}, maxReplicas=1)
    choice = choose.choose_plan(spec, 50.0)
    used = _used(choice.plan.replicas())
    assert used == {"spot": 1, preferred: 2}
    plain = choose.choose_plan(_twins({}, maxReplicas=1), 50.0)
    assert plain.plan.cost_per_hour == choice.plan.cost_per_hour
    assert choice.plan.status == plain.plan.status == "Optimal"


def test_priority_never_buys_a_dearer_plan() -> None:
    spec = _twins({"zone-a": 10})  # the spot type is cheaper: priority must not pick zone-a
    assert _used(choose.choose_plan(spec, 50.0).plan.replicas()) == {"spot": 3}


def test_priority_orders_the_fallback_when_a_type_is_capped() -> None:
    spec = _twins({"zone-b": 5})
    caps = update_capacity(
        Capacity({"spot": T0}),
        {"spot": PoolReading(3, 1)},
        T0 + timedelta(hours=1),
        60,
        600,
    ).capacity.caps
    assert _used(choose.choose_plan(spec, 50.0, caps=caps).plan.replicas()) == {
        "spot": 1,
        "zone-b": 2,
    }
