"""The node pools of an allocation: their scope (namespace isolation), their owner (one allocation
per target), and bringing each to the plan, reverting or reporting outside changes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from melange import api
from melange.api.conditions import Condition, timestamp
from melange.controller import decide, metrics, transition
from melange.controller.errors import ScaleError
from melange.controller.settings import Settings
from melange.controller.state import EventSpec, Key, Kube, Work
from melange.signals import rates

log = logging.getLogger("melange.controller")


class Pools:
    def __init__(
        self, kube: Kube, settings: Settings, bodies: Mapping[Key, Mapping[str, Any]]
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.bodies = bodies  # every allocation as last seen: their claims on targets
        self._scopes: dict[tuple[str, str], tuple[str, bool]] = {}
        self._claims_version = 0
        self._index: tuple[int, decide.ClaimIndex] | None = None

    async def _scope(self, ref: api.ObjectReference) -> tuple[str, bool]:
        kind = (ref.group, ref.kind)
        if kind not in self._scopes:
            self._scopes[kind] = await asyncio.to_thread(self.kube.scope, ref)
        return self._scopes[kind]

    async def _target_key(self, namespace: str, ref: api.ObjectReference) -> decide.TargetKey:
        _, namespaced = await self._scope(ref)
        return _key(namespace, ref, namespaced)

    def claims_changed(self) -> None:
        """An allocation was added, deleted or its spec changed: the claim index is stale."""
        self._claims_version += 1

    async def claim_index(self) -> decide.ClaimIndex:
        """Every allocation's claim on its targets, from the specs as they are stored; built again
        only after a spec changed (or while a target's kind is not served: it may be soon)."""
        if self._index is not None and self._index[0] == self._claims_version:
            return self._index[1]
        version, complete, claims = self._claims_version, True, []
        for other, body in list(self.bodies.items()):
            targets = []
            for gpu in body["spec"].get("gpus") or ():
                ref = _reference(gpu)
                if ref is None:
                    continue
                try:
                    targets.append(await self._target_key(other[0], ref))
                except ScaleError:
                    complete = False  # a kind the API server does not serve claims nothing
            claims.append(decide.Claim(other, str(body.get("created") or ""), tuple(targets)))
        index = decide.ClaimIndex.of(claims)
        if complete and version == self._claims_version:
            self._index = (version, index)
        return index

    async def scale(
        self,
        key: Key,
        body: Mapping[str, Any],
        spec: api.AllocationSpec,
        desired: Mapping[str, int],
        reason: str,
        work: Work,
        now: datetime,
        interval: float = 0.0,
    ) -> ScaleResult:
        """Check ownership and scope, then bring each pool to the plan (step by step with
        spec.transition); the Scaled condition and the transition's."""
        namespace, name = key
        if spec.dry_run:
            metrics.record_pool_replicas(namespace, name, {}, {})
            return ScaleResult(decide.scaled_condition([], dry_run=True))
        refused, mine, scopes = [], [], {}
        for gpu in spec.gpus:
            ref = gpu.scale_target_ref
            assert ref is not None  # checked by api.validate_resource_spec
            try:
                resource, namespaced = await self._scope(ref)
            except ScaleError:
                continue  # reported per pool below
            scopes[gpu.name] = namespaced
            mine.append(_key(namespace, ref, namespaced))
            if not namespaced and resource not in self.settings.allow_cluster_scoped:
                refused.append(
                    f"{decide.target_name(gpu)} ({gpu.name}): {resource} is cluster-scoped and not "
                    "in the operator's allow-list (--allow-cluster-scoped)"
                )
        if refused:
            return ScaleResult(decide.not_allowed_condition(refused))
        created = str(body.get("created") or "")
        index = await self.claim_index()
        conflicts = index.conflicts(decide.Claim(key, created, tuple(mine)))
        if conflicts:
            return ScaleResult(decide.conflict_condition(conflicts))

        records = decide.pool_records(work.status)
        mbb = spec.transition
        reads: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for gpu in spec.gpus:
            ref = gpu.scale_target_ref
            assert ref is not None
            where = namespace if scopes.get(gpu.name, True) else None
            ready_path = gpu.ready_replicas_path if mbb is not None else None
            try:
                reads[gpu.name] = await asyncio.to_thread(
                    self.kube.read_replicas, where, ref, gpu.replicas_path, ready_path
                )
            except ScaleError as exc:
                errors[gpu.name] = str(exc)
        readings = {
            name: transition.PoolReading(
                0 if read.value is None else int(read.value), getattr(read, "ready", None)
            )
            for name, read in reads.items()
        }
        step = transition.spec_step(
            spec,
            {name: desired[name] for name in readings},
            readings,
            {name: record.last_scale for name, record in records.items()},
            rates.parse_time(work.status.get("transitionSince")),
            now,
            interval,
        )

        reasons: dict[str, str] = {}
        outcomes = []
        after: dict[str, transition.PoolReading] = {}
        for gpu in spec.gpus:
            ref = gpu.scale_target_ref
            assert ref is not None
            target = decide.target_name(gpu)
            where = namespace if scopes.get(gpu.name, True) else None
            want = step.targets.get(gpu.name, desired[gpu.name])
            record = records.get(gpu.name)
            base = decide.PoolRecord(
                target,
                want,
                0,
                planned=desired[gpu.name],
                ready=readings[gpu.name].ready if gpu.name in readings else None,
                short_since=record.short_since if record is not None else None,
                last_scale=record.last_scale if record is not None else None,
            )
            if gpu.name in errors:
                outcomes.append(decide.ScaleOutcome(gpu.name, target, want, error=errors[gpu.name]))
                continue
            read, current = reads[gpu.name], readings[gpu.name].current
            try:
                action = decide.pool_action(current, want, record, gpu.policy, target, reason)
                outcome = decide.ScaleOutcome(gpu.name, target, want, previous=current)
                if action.outside and record is not None:
                    kept = not action.patch
                    message = decide.outside_change_message(outcome, current, record, kept)
                    log.warning("[%s/%s] %s", *key, message)
                    work.events.append(EventSpec("Warning", "OutsideChange", message))
                    metrics.record_outside_change(namespace, name, gpu.name, reverted=not kept)
                if action.patch:
                    change = await asyncio.to_thread(
                        self.kube.ensure_replicas, where, ref, gpu.replicas_path, want, read
                    )
                    outcome = decide.ScaleOutcome(
                        gpu.name, target, want, previous=change.previous, patched=change.patched
                    )
                    reasons[gpu.name] = action.reason
                    records[gpu.name] = replace(
                        base,
                        observed=change.current,
                        last_scale=now if change.patched else base.last_scale,
                    )
                else:
                    if current != want:
                        outcome = decide.ScaleOutcome(
                            gpu.name, target, want, previous=current, kept=current
                        )
                    # not patched: at the plan, or left by Observe at a plan already asked for
                    records[gpu.name] = replace(base, observed=current)
                after[gpu.name] = transition.PoolReading(
                    records[gpu.name].observed, readings[gpu.name].ready
                )
            except ScaleError as exc:
                outcome = decide.ScaleOutcome(gpu.name, target, want, error=str(exc))
            outcomes.append(outcome)
        for outcome in outcomes:
            if outcome.patched or outcome.error:
                metrics.record_patch(namespace, name, outcome.gpu, ok=not outcome.error)
            if outcome.patched:
                message = (
                    f"{outcome.target} ({outcome.gpu}): {outcome.previous} -> {outcome.desired} "
                    f"({reasons.get(outcome.gpu, reason)})"
                )
                log.info("[%s/%s] Scaled %s", *key, message)
                work.events.append(EventSpec("Normal", "Scaled", message))
        result = ScaleResult(decide.scaled_condition(outcomes, dry_run=False))
        if mbb is None and step.limited and result.scaled.status == "True":
            # a step limit holds a pool short of the plan: not there yet
            result = ScaleResult(decide.transition_scaled(step, desired, readings))
        if mbb is not None:
            result = self._transition(key, spec, records, after, step, desired, work, now, result)
        policies = {g.name: g.policy for g in spec.gpus}
        kept_records = {g.name: records[g.name] for g in spec.gpus if g.name in records}
        metrics.record_pool_replicas(
            namespace,
            name,
            {g: r.desired for g, r in kept_records.items()},
            {g: r.observed for g, r in kept_records.items()},
        )
        work.status["targets"] = decide.targets_status(kept_records, policies)
        patches = decide.recent_patches(work.status.get("recentPatches"), outcomes, reasons, now)
        if patches or work.status.get("recentPatches") is not None:
            work.status["recentPatches"] = patches
        return result

    def _transition(
        self,
        key: Key,
        spec: api.AllocationSpec,
        records: dict[str, decide.PoolRecord],
        after: Mapping[str, transition.PoolReading],
        step: transition.Step,
        planned: Mapping[str, int],
        work: Work,
        now: datetime,
        result: ScaleResult,
    ) -> ScaleResult:
        """Make-before-break's status: the transition, the pools' shortfalls and capacity caps."""
        mbb = spec.transition
        assert mbb is not None
        readings = {name: after.get(name, transition.PoolReading(0)) for name in planned}
        moving = step.in_progress or any(r.ready_count < r.current for r in after.values())
        if moving:
            work.status.setdefault("transitionSince", timestamp(now))
        else:
            work.status["transitionSince"] = None
        known = transition.Capacity(
            {n: r.short_since for n, r in records.items() if r.short_since is not None},
            decide.caps_from_status(work.status),
        )
        change = transition.update_capacity(
            known, after, now, mbb.capacity_timeout_seconds, mbb.capacity_retry_seconds
        )
        for name, record in records.items():
            records[name] = replace(record, short_since=change.capacity.short_since.get(name))
        work.status["gpuCaps"] = decide.caps_status(change.capacity.caps)
        for name in change.new_caps:
            cap = change.capacity.caps[name]
            message = (
                f"{name} stayed short of its count for {mbb.capacity_timeout_seconds} s: capped at "
                f"{cap.replicas} (ready) until {timestamp(cap.retry)}; the other types take its traffic"
            )
            log.warning("[%s/%s] %s", *key, message)
            work.events.append(EventSpec("Warning", "CapacityShort", message))
        for name in change.lifted:
            message = f"{name}'s capacity cap ran out: asking for its full count again"
            log.info("[%s/%s] %s", *key, message)
            work.events.append(EventSpec("Normal", "CapacityRetry", message))
        scaled = result.scaled
        if scaled.status == "True" and moving:
            scaled = decide.transition_scaled(step, planned, readings)
        extra = [decide.transition_condition(step, planned, readings, mbb.ready_timeout_seconds)]
        if mbb.capacity_timeout_seconds is not None:
            extra.append(decide.capacity_condition(change.capacity.caps))
        return ScaleResult(
            scaled, extra, moving=moving, caps_changed=bool(change.new_caps or change.lifted)
        )


@dataclass(frozen=True)
class ScaleResult:
    """What scaling said: the Scaled condition, the transition's conditions, and whether to look
    again soon (pools on their way) or re-solve (a capacity cap set or lifted)."""

    scaled: Condition
    conditions: list[Condition] = field(default_factory=list)
    moving: bool = False
    caps_changed: bool = False


def _key(namespace: str, ref: api.ObjectReference, namespaced: bool) -> decide.TargetKey:
    """A target as ownership sees it: a cluster-scoped one is the same in every namespace."""
    return (namespace if namespaced else "", ref.group, ref.kind, ref.name)


def _reference(gpu: Any) -> api.ObjectReference | None:
    """The scale target of a stored `gpus[]` entry, when it is well formed."""
    if not isinstance(gpu, Mapping) or not isinstance(gpu.get("scaleTargetRef"), Mapping):
        return None
    try:
        return api.ObjectReference.model_validate(gpu["scaleTargetRef"])
    except ValueError:
        return None
