"""How the pools move to a new plan: make-before-break, capacity in flight, step limits, and
capacity caps for GPU types that cannot get what they ask for. Pure: the readings in, the counts
to set and the caps out, so the same decisions run in the operator and in the offline replay.

A GPU node takes minutes to join, and a type can be out of capacity for hours. So:
- scale-ups go first; scale-downs wait until every type asked to grow (or to stay) is ready at
  its count, or until `readyTimeoutSeconds` have passed since the transition began. While they
  wait, the old capacity is all still there, and once they go, the new plan's is ready: the ready
  fleet never serves less than the smaller of the two plans needs;
- a type whose earlier scale-up is not ready yet is not asked for more (no stacking on capacity
  in flight);
- `maxScaleUpPerInterval` / `maxScaleDownPerInterval` bound each step, one step per interval;
- a type short of its count for `capacityTimeoutSeconds` is capped at what is ready until
  `capacityRetrySeconds` later, and the plan is solved within the cap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from melange.api import AllocationSpec


@dataclass(frozen=True)
class PoolReading:
    """One pool as read: the count it is asked for and, where the target shows it, how many are ready."""

    current: int
    ready: int | None = None  # None: the target shows no ready count (counts as all ready)

    @property
    def ready_count(self) -> int:
        return self.current if self.ready is None else self.ready


@dataclass(frozen=True)
class StepLimits:
    max_up: int | None = None
    max_down: int | None = None
    last_scale: datetime | None = None  # when this pool was last patched


@dataclass(frozen=True)
class Step:
    """The counts to set now, and why some differ from the plan."""

    targets: dict[str, int]
    waiting: tuple[str, ...] = ()  # types whose asked-for capacity is not ready yet
    held: tuple[str, ...] = ()  # types whose scale-down waits for that capacity
    pending: tuple[str, ...] = ()  # types not asked for more while their scale-up is in flight
    limited: tuple[str, ...] = ()  # types held back by a step limit
    timed_out: bool = False  # scale-downs went ahead after readyTimeoutSeconds

    @property
    def in_progress(self) -> bool:
        return bool(self.waiting or self.held or self.pending or self.limited)


def _step_due(limits: StepLimits, now: datetime, interval: float) -> bool:
    return limits.last_scale is None or (now - limits.last_scale).total_seconds() >= interval


def next_step(
    planned: Mapping[str, int],
    pools: Mapping[str, PoolReading],
    *,
    make_before_break: bool,
    waited_seconds: float = 0.0,
    ready_timeout: float = math.inf,
    limits: Mapping[str, StepLimits] | None = None,
    now: datetime | None = None,
    interval: float = 0.0,
) -> Step:
    """The counts to set on the pools now, on the way to `planned`.

    Without make-before-break every pool goes to the plan at once (within its step limit).
    `waited_seconds` is how long the transition has been under way (since it first had to wait).
    """
    limits = limits or {}
    targets: dict[str, int] = {}
    pending, limited = [], []
    for name, want in planned.items():
        pool = pools[name]
        limit = limits.get(name, StepLimits())
        if want <= pool.current:
            targets[name] = pool.current  # scale-downs are decided below
            continue
        if make_before_break and pool.ready_count < pool.current:
            targets[name] = pool.current
            pending.append(name)
            continue
        target = want
        if limit.max_up is not None:
            due = now is None or _step_due(limit, now, interval)
            target = min(want, pool.current + limit.max_up) if due else pool.current
        if target < want:
            limited.append(name)
        targets[name] = target
    waiting = [
        name
        for name, want in planned.items()
        if (ready := pools[name].ready) is not None and ready < min(targets[name], want)
    ]
    timed_out = bool(waiting) and waited_seconds >= ready_timeout
    held = []
    for name, want in planned.items():
        pool = pools[name]
        if want >= pool.current:
            continue
        if make_before_break and waiting and not timed_out:
            held.append(name)
            continue
        limit = limits.get(name, StepLimits())
        target = want
        if limit.max_down is not None:
            due = now is None or _step_due(limit, now, interval)
            target = max(want, pool.current - limit.max_down) if due else pool.current
        if target > want:
            limited.append(name)
        targets[name] = target
    return Step(
        targets,
        waiting=tuple(waiting),
        held=tuple(held),
        pending=tuple(pending),
        limited=tuple(limited),
        timed_out=timed_out and any(planned[n] < pools[n].current for n in planned),
    )


def spec_step(
    spec: AllocationSpec,
    planned: Mapping[str, int],
    pools: Mapping[str, PoolReading],
    last_scale: Mapping[str, datetime | None],
    since: datetime | None,
    now: datetime,
    interval: float,
) -> Step:
    """`next_step` with the spec's knobs: make-before-break and its timeout from spec.transition
    (the transition under way since `since`), the step limits from gpus[], and when each pool
    was last patched."""
    mbb = spec.transition
    return next_step(
        planned,
        pools,
        make_before_break=mbb is not None,
        waited_seconds=(now - since).total_seconds() if since else 0.0,
        ready_timeout=mbb.ready_timeout_seconds if mbb is not None else math.inf,
        limits={
            g.name: StepLimits(
                g.max_scale_up_per_interval, g.max_scale_down_per_interval, last_scale.get(g.name)
            )
            for g in spec.gpus
        },
        now=now,
        interval=interval,
    )


# -- capacity caps --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cap:
    """A GPU type capped at `replicas` (what was ready) until `retry`."""

    replicas: int
    since: datetime
    retry: datetime


@dataclass(frozen=True)
class Capacity:
    """Per type: since when it is short of its asked-for count, and the caps in force."""

    short_since: dict[str, datetime] = field(default_factory=dict)
    caps: dict[str, Cap] = field(default_factory=dict)


@dataclass(frozen=True)
class CapacityChange:
    capacity: Capacity
    new_caps: tuple[str, ...] = ()  # capped in this update
    lifted: tuple[str, ...] = ()  # whose cap ran out: asked for their full count again


def update_capacity(
    capacity: Capacity,
    pools: Mapping[str, PoolReading],
    now: datetime,
    timeout: float | None,
    retry: float,
) -> CapacityChange:
    """Track which types stay short of what they are asked for, and cap those that stay too long.

    A type is short when fewer of its replicas are ready than it is asked for. Caps whose retry
    time has come are lifted (the next plan asks for the type again; if it stays short, it is
    capped again after another timeout).
    """
    short_since: dict[str, datetime] = {}
    for name, pool in pools.items():
        if pool.ready_count < pool.current:
            short_since[name] = capacity.short_since.get(name, now)
    caps = {name: cap for name, cap in capacity.caps.items() if name in pools}
    lifted = tuple(name for name, cap in caps.items() if now >= cap.retry)
    for name in lifted:
        del caps[name]
        short_since.pop(name, None)  # a fresh ask gets a fresh timeout
    new_caps = []
    if timeout is not None:
        for name, since in short_since.items():
            if name in caps or name in lifted:
                continue
            if (now - since).total_seconds() >= timeout:
                caps[name] = Cap(pools[name].ready_count, now, now + timedelta(seconds=retry))
                new_caps.append(name)
    return CapacityChange(Capacity(short_since, caps), tuple(new_caps), lifted)
