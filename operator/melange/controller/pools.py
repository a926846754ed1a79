"""The node pools of an allocation: their scope (namespace isolation), their owner (one allocation
per target), and bringing each to the plan, reverting or reporting outside changes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from melange import api
from melange.api.conditions import Condition
from melange.controller import decide, metrics
from melange.controller.errors import ScaleError
from melange.controller.settings import Settings
from melange.controller.state import EventSpec, Key, Kube, Work

log = logging.getLogger("melange.controller")


class Pools:
    def __init__(
        self, kube: Kube, settings: Settings, bodies: Mapping[Key, Mapping[str, Any]]
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.bodies = bodies  # every allocation as last seen: their claims on targets
        self._scopes: dict[tuple[str, str], tuple[str, bool]] = {}

    async def _scope(self, ref: api.ObjectReference) -> tuple[str, bool]:
        kind = (ref.group, ref.kind)
        if kind not in self._scopes:
            self._scopes[kind] = await asyncio.to_thread(self.kube.scope, ref)
        return self._scopes[kind]

    async def _target_key(self, namespace: str, ref: api.ObjectReference) -> decide.TargetKey:
        _, namespaced = await self._scope(ref)
        return _key(namespace, ref, namespaced)

    async def _claims(self, key: Key) -> list[decide.Claim]:
        """Every other allocation's claim on its targets, from the specs as they are stored."""
        claims = []
        for other in list(self.bodies):
            if other == key:
                continue
            body = self.bodies.get(other)
            if body is None:
                continue
            targets = []
            for gpu in body["spec"].get("gpus") or ():
                ref = _reference(gpu)
                if ref is None:
                    continue
                try:
                    targets.append(await self._target_key(other[0], ref))
                except ScaleError:
                    continue  # a kind the API server does not serve claims nothing
            claims.append(decide.Claim(other, str(body.get("created") or ""), tuple(targets)))
        return claims

    async def scale(
        self,
        key: Key,
        body: Mapping[str, Any],
        spec: api.AllocationSpec,
        desired: Mapping[str, int],
        reason: str,
        work: Work,
        now: datetime,
    ) -> Condition:
        """Check ownership and scope, then bring each pool to the plan; the Scaled condition."""
        namespace, name = key
        if spec.dry_run:
            return decide.scaled_condition([], dry_run=True)
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
            return decide.not_allowed_condition(refused)
        created = str(body.get("created") or "")
        conflicts = decide.target_conflicts(
            decide.Claim(key, created, tuple(mine)), await self._claims(key)
        )
        if conflicts:
            return decide.conflict_condition(conflicts)

        records = decide.pool_records(work.status)
        reasons: dict[str, str] = {}
        outcomes = []
        for gpu in spec.gpus:
            ref = gpu.scale_target_ref
            assert ref is not None
            target = decide.target_name(gpu)
            where = namespace if scopes.get(gpu.name, True) else None
            want = desired[gpu.name]
            try:
                read = await asyncio.to_thread(
                    self.kube.read_replicas, where, ref, gpu.replicas_path
                )
                current = 0 if read.value is None else int(read.value)
                record = records.get(gpu.name)
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
                    records[gpu.name] = decide.PoolRecord(target, want, change.current)
                else:
                    if current != want:
                        outcome = decide.ScaleOutcome(
                            gpu.name, target, want, previous=current, kept=current
                        )
                    # not patched: at the plan, or left by Observe at a plan already asked for
                    records[gpu.name] = decide.PoolRecord(target, want, current)
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
        policies = {g.name: g.policy for g in spec.gpus}
        kept_records = {g.name: records[g.name] for g in spec.gpus if g.name in records}
        work.status["targets"] = decide.targets_status(kept_records, policies)
        patches = decide.recent_patches(work.status.get("recentPatches"), outcomes, reasons, now)
        if patches or work.status.get("recentPatches") is not None:
            work.status["recentPatches"] = patches
        return decide.scaled_condition(outcomes, dry_run=False)


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
