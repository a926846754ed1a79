"""The controller: the one path from an allocation's spec to its node pools and its status.

Kopf only hands over each allocation (spec, status, metadata) as the watch stream shows it; this
loop decides when each one is due and reconciles it:
- at once when its spec changes (a new `metadata.generation`) or it is first seen;
- every `rateSource.intervalSeconds` when it has a rate source: query Prometheus, decide drift;
- every resync interval otherwise: read the pools, set back an outside change.
One reconcile runs per allocation at a time. It parses and validates the spec once, decides
(signals, plan, ownership, pools) with the pure functions of `decide`, acts, and writes the
status once, through the one client, only when a field changed. Only the leader runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from melange import api
from melange.api import conditions
from melange.api.conditions import Condition
from melange.controller import decide, metrics
from melange.controller.errors import NotLeader, ScaleError, StatusGone
from melange.plan import solver
from melange.plan.result import Plan
from melange.signals import distribution, rates
from melange.signals.distribution import Observation
from melange.signals.prometheus import PrometheusClient
from melange.signals.rates import RateError

TICK_SECONDS = 1.0
RESYNC_SECONDS = 30.0
SCALE_RETRY_SECONDS = 15.0
MAX_CONCURRENT = 16
STOP_GRACE_SECONDS = 10.0

Key = tuple[str, str]  # (namespace, name)
log = logging.getLogger("melange.controller")


class Kube(Protocol):
    """What the controller needs of the Kubernetes client (`controller.kube.client.KubeClient`)."""

    def scope(self, ref: api.ObjectReference) -> tuple[str, bool]: ...

    def read_replicas(
        self, namespace: str | None, ref: api.ObjectReference, replicas_path: str | None
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

    def credentials(
        self, namespace: str, source: api.PrometheusSource
    ) -> tuple[str | None, str | None]: ...


@dataclass(frozen=True)
class Settings:
    resync_seconds: float = RESYNC_SECONDS
    allow_cluster_scoped: frozenset[str] = (
        frozenset()
    )  # "resource.group", e.g. nodepools.karpenter.sh


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

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> RateState:
        solved = status.get("solvedRate")
        matrix = status.get("solvedDistribution")
        return cls(
            history=rates.history_from_status(status.get("rateHistory")),
            solved_rate=float(solved) if isinstance(solved, int | float) else None,
            observed_before=status.get("lastObservationTime") is not None,
            condition=_stored_condition(status, conditions.RATE_OBSERVED),
            solved_distribution=matrix if isinstance(matrix, list) else None,
            distribution_condition=_stored_condition(status, conditions.DISTRIBUTION_OBSERVED),
        )

    def plan_rate(self) -> float | None:
        """The rate to solve for: the decided one, once there was an observation."""
        return self.solved_rate if self.observed_before else None


def _stored_condition(status: Mapping[str, Any], kind: str) -> Condition | None:
    found = conditions.find(status.get("conditions"), kind)
    if found is None or found.get("status") not in {"True", "False", "Unknown"}:
        return None
    return Condition(
        kind, found["status"], str(found.get("reason", "")), str(found.get("message", ""))
    )


def _transitioned(before: Condition | None, after: Condition) -> bool:
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
    solved: tuple[str, Plan] | None = None  # (what it was solved for, the plan)
    task: asyncio.Task[None] | None = None


@dataclass
class Work:
    """What one reconcile builds up: the status fields to write and the Events to post."""

    status: dict[str, Any]
    events: list[EventSpec] = field(default_factory=list)
    updates: list[Condition] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def _interval(spec: Mapping[str, Any]) -> float:
    raw = (spec.get("rateSource") or {}).get("intervalSeconds", 30)
    return float(min(max(raw if isinstance(raw, int) else 30, 5), 3600))


class Controller:
    def __init__(
        self,
        kube: Kube,
        leading: Callable[[], bool],
        settings: Settings = Settings(),
        prometheus: PrometheusClient | None = None,
    ) -> None:
        self.bodies: dict[Key, dict[str, Any]] = {}  # every allocation as last seen on the watch
        self.kube = kube
        self.leading = leading
        self.settings = settings
        self.prometheus = prometheus or PrometheusClient()
        self.states: dict[Key, AllocationState] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._semaphore = asyncio.Semaphore(MAX_CONCURRENT)
        self._scopes: dict[tuple[str, str], tuple[str, bool]] = {}

    # -- life cycle

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="melange controller")

    def wake(self) -> None:
        self._wake.set()

    def observe(self, key: Key, body: dict[str, Any] | None) -> None:
        """An allocation as the watch stream shows it now (None: deleted); due ones run at once."""
        if body is None:
            self.bodies.pop(key, None)
        else:
            self.bodies[key] = body
        self.wake()

    def leadership_changed(self, leading: bool) -> None:
        """Drop what this replica knew: as the new leader, start again from the stored status."""
        metrics.record_leader(leading)
        self.states.clear()
        self.wake()

    async def stop(self) -> None:
        """Stop; let reconciles in flight finish (they write their status), then close."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        running = {s.task for s in self.states.values() if s.task is not None and not s.task.done()}
        if running:
            _, pending = await asyncio.wait(running, timeout=STOP_GRACE_SECONDS)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.prometheus.close()

    async def _run(self) -> None:
        while True:
            try:
                self._tick()
            except Exception:
                log.exception("The controller's tick failed; trying again")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_SECONDS)

    def _latest(self, key: Key) -> Mapping[str, Any] | None:
        return self.bodies.get(key)

    def _tick(self) -> None:
        if not self.leading():
            return
        now = asyncio.get_running_loop().time()
        seen = set()
        for key in list(self.bodies):
            body = self._latest(key)
            if body is None:
                continue
            seen.add(key)
            state = self.states.get(key)
            if state is None or state.uid != body.get("uid"):  # new, or deleted and created again
                state = AllocationState(
                    body.get("uid"), dict(body["status"]), RateState.from_status(body["status"])
                )
                self.states[key] = state
            if state.task is not None and not state.task.done():
                continue
            spec = body["spec"]
            source = spec.get("rateSource") if isinstance(spec.get("rateSource"), Mapping) else None
            changed = body["generation"] != state.generation
            poll = source is not None and (now >= state.next_poll or source != state.polled_source)
            if not (changed or poll or now >= state.next_resync):
                continue
            if poll:
                state.polled_source = source
                state.next_poll = now + _interval(spec)
            state.next_resync = now + (
                _interval(spec) if source is not None else self.settings.resync_seconds
            )
            if changed and state.generation == 0:  # first sight: a new object, or a restart
                trigger = "resume" if state.status.get("observedGeneration") else "create"
            else:
                trigger = "spec" if changed else ("poll" if poll else "resync")
            state.task = asyncio.create_task(
                self._guarded(key, state, trigger, poll and not changed), name=f"reconcile {key}"
            )
        for key in [k for k, s in self.states.items() if k not in seen]:
            task = self.states[key].task
            if task is None or task.done():
                self.forget(key)

    def forget(self, key: Key) -> None:
        state = self.states.pop(key, None)
        if state is not None:
            gpus = [
                g.get("name", "") for g in state.status.get("gpus") or [] if isinstance(g, dict)
            ]
            metrics.forget(*key, gpus)
            metrics.forget_rate_source(*key)

    async def _guarded(self, key: Key, state: AllocationState, trigger: str, poll: bool) -> None:
        try:
            async with self._semaphore:
                await self.reconcile(key, state, trigger, poll)
        except asyncio.CancelledError:
            raise
        except NotLeader:
            log.info("[%s/%s] Lost the Lease: the reconcile stopped before writing", *key)
        except StatusGone:
            self.forget(key)
        except Exception:
            # Not at once (no hot loop on a persistent failure): after a pause, as a resync.
            log.exception(
                "[%s/%s] Reconcile failed; trying again in %.0f s", *key, SCALE_RETRY_SECONDS
            )
            body = self._latest(key)
            if body is not None:
                state.generation = int(body["generation"])
            state.next_resync = asyncio.get_running_loop().time() + SCALE_RETRY_SECONDS

    # -- one reconcile

    async def reconcile(self, key: Key, state: AllocationState, trigger: str, poll: bool) -> None:
        namespace, name = key
        body = self._latest(key)
        if body is None or body.get("uid") != state.uid:
            return
        generation = int(body["generation"])
        now = datetime.now(UTC).replace(microsecond=0)
        work = Work(status=dict(state.status))
        raw = body["spec"]
        try:
            spec = api.validate_resource_spec(dict(raw))
        except api.SpecError as exc:
            log.warning("[%s/%s] Invalid spec, node pools left as they are: %s", *key, exc)
            metrics.record_error(namespace, name, "InvalidSpec")
            work.updates = decide.invalid_conditions(exc.errors)
            if "rateSource" not in raw:
                work.dropped.append(conditions.RATE_OBSERVED)
            workload = raw.get("workload")
            if not (isinstance(workload, Mapping) and "fromPrometheus" in workload):
                work.dropped.append(conditions.DISTRIBUTION_OBSERVED)
            await self._finish(key, body, state, work, generation, now, trigger)
            return

        reason = {
            "create": "Create",
            "resume": "Resume",
            "spec": "SpecChange",
            "poll": "Resync",
            "resync": "Resync",
        }[trigger]
        rate, matrix = state.rate.plan_rate(), state.rate.solved_distribution
        follows = decide.distribution_model(spec) is not None
        if spec.rate_source is None:
            work.dropped.append(conditions.RATE_OBSERVED)
            work.status.update(decide.cleared_rate_status(work.status))
            state.rate = RateState()
        if not follows:
            work.dropped.append(conditions.DISTRIBUTION_OBSERVED)
            work.status.update(distribution.cleared_status(work.status))
            state.rate.solved_distribution = matrix = None
        if poll and spec.rate_source is not None:
            drift = await self._observe(key, spec, state, work, now)
            if drift is not None:
                reason, rate, matrix = drift
        if spec.rate_source is not None and state.rate.condition is not None:
            work.updates.append(state.rate.condition)
        if follows and state.rate.distribution_condition is not None:
            work.updates.append(state.rate.distribution_condition)

        plan = await self._solve(key, spec, state, work, rate, matrix, reason, now)
        if not plan.solved:
            log.warning("[%s/%s] No feasible plan, node pools left as they are", *key)
            metrics.record_error(namespace, name, plan.status)
            work.updates = decide.infeasible_conditions(plan) + work.updates
            await self._finish(key, body, state, work, generation, now, trigger)
            return
        desired = decide.desired_replicas(spec, plan)
        scaled = await self._scale(key, body, spec, desired, reason, work, now)
        work.updates = [*decide.with_ready([decide.solved_condition(plan), scaled]), *work.updates]
        failed = scaled.reason == "ScaleFailed"
        if failed:
            metrics.record_error(namespace, name, "ScaleFailed")
        await self._finish(key, body, state, work, generation, now, trigger, retry=failed)

    async def _observe(
        self,
        key: Key,
        spec: api.AllocationSpec,
        state: AllocationState,
        work: Work,
        now: datetime,
    ) -> tuple[str, float | None, list[list[float]] | None] | None:
        """Query the rate source; the re-solve (reason, rate, distribution) when it drifted."""
        namespace, name = key
        source = spec.rate_source
        assert source is not None
        observation: Observation | RateError | None = None
        observed: float | None = None
        error: RateError | None = None
        try:
            token, ca = await asyncio.to_thread(self.kube.credentials, namespace, source.prometheus)
            observed, observation = await asyncio.gather(
                self.prometheus.query_rate(
                    source.prometheus.url,
                    decide.rate_query(source),
                    bearer_token=token,
                    ca_pem=ca,
                    timeout=decide.query_timeout(source),
                ),
                self._observe_distribution(spec, token, ca),
            )
        except RateError as exc:
            error = exc
        metrics.record_rate_query(
            namespace, name, "ok" if error is None else error.reason, observed
        )
        rate_state = state.rate
        if error is not None:
            condition = decide.rate_failed(error)
            if _transitioned(rate_state.condition, condition):
                log.warning("[%s/%s] No usable rate (%s): %s", *key, error.reason, error.message)
                work.events.append(condition_event(condition))
            rate_state.condition = condition
            return None
        assert observed is not None
        decision = rates.decide(
            rate_state.history,
            observed,
            rate_state.solved_rate,
            tolerance=source.drift_tolerance,
            window_seconds=source.scale_down_stabilization_seconds,
            now=now,
            first_observation=not rate_state.observed_before,
        )
        condition = decide.rate_observed(observed, source.prometheus.url)
        if _transitioned(rate_state.condition, condition):
            log.info("[%s/%s] Rate observed: %s", *key, condition.message)
            work.events.append(condition_event(condition))
        rate_state.condition = condition
        rate_state.history = list(decision.history)
        rate_state.observed_before = True
        work.status.update(decide.observation_status(observed, now, decision.history))
        moved = self._distribution(key, spec, state, observation, work)
        shape = moved is not None and moved.resolve
        if decision.resolve:
            log.info("[%s/%s] Rate drift: %s", *key, decision.message)
            work.events.append(EventSpec("Normal", "RateDrift", decision.message))
        else:
            log.debug("[%s/%s] %s", *key, decision.message)
        rate = decision.rate if decision.resolve else rate_state.solved_rate
        matrix = (
            observation.matrix
            if shape and isinstance(observation, Observation)
            else rate_state.solved_distribution
        )
        if decision.resolve:
            return "RateDrift", rate, matrix
        if shape:
            return "DistributionDrift", rate, matrix
        return None

    async def _observe_distribution(
        self, spec: api.AllocationSpec, token: str | None, ca: str | None
    ) -> Observation | RateError | None:
        """The fitted distribution, the reason there is none, or None when it is not followed."""
        model, source, follow = (
            decide.distribution_model(spec),
            spec.rate_source,
            spec.workload.from_prometheus,
        )
        if model is None or source is None or follow is None:
            return None
        try:
            prompt, generation = await self.prometheus.token_histograms(
                source.prometheus.url,
                model,
                follow.window_seconds,
                bearer_token=token,
                ca_pem=ca,
                timeout=decide.query_timeout(source),
            )
            return distribution.observe(
                spec.workload.distribution,
                spec.buckets.input_tokens,
                spec.buckets.output_tokens,
                prompt,
                generation,
                min_requests=follow.min_requests,
            )
        except RateError as exc:
            return exc

    def _distribution(
        self,
        key: Key,
        spec: api.AllocationSpec,
        state: AllocationState,
        observation: Observation | RateError | None,
        work: Work,
    ) -> distribution.Drift | None:
        """Update the DistributionObserved condition and status; the drift, when there is one."""
        follow = spec.workload.from_prometheus
        if observation is None or follow is None:
            return None
        moved = None
        if isinstance(observation, RateError):
            condition = decide.distribution_failed(observation)
        else:
            solved = (
                distribution.fitting(state.rate.solved_distribution, spec.buckets)
                or spec.workload.distribution
            )
            moved = distribution.drift(solved, observation.matrix, follow.drift_tolerance)
            condition = decide.distribution_observed(
                observation.summary(follow.window_seconds), moved.distance
            )
            metrics.record_distribution_distance(*key, moved.distance)
            work.status.update(distribution.observation_status(observation, moved.distance))
            if moved.resolve:
                changes = distribution.describe_largest_moves(
                    solved,
                    observation.matrix,
                    (spec.buckets.input_tokens, spec.buckets.output_tokens),
                )
                message = moved.message + (f" (largest: {changes})" if changes else "")
                log.info("[%s/%s] Distribution drift: %s", *key, message)
                work.events.append(EventSpec("Normal", "DistributionDrift", message))
        if _transitioned(state.rate.distribution_condition, condition):
            log.info("[%s/%s] Distribution: %s", *key, condition.message)
            work.events.append(condition_event(condition))
        state.rate.distribution_condition = condition
        return moved

    async def _solve(
        self,
        key: Key,
        spec: api.AllocationSpec,
        state: AllocationState,
        work: Work,
        rate: float | None,
        matrix: list[list[float]] | None,
        reason: str,
        now: datetime,
    ) -> Plan:
        """The plan for this spec, rate and distribution: solved again only when one changed."""
        fitted = distribution.fitting(matrix, spec.buckets) if matrix is not None else None
        if fitted is not None:
            spec = spec.model_copy(
                update={"workload": spec.workload.model_copy(update={"distribution": fitted})}
            )
        inputs = json.dumps([spec.model_dump(mode="json"), rate], sort_keys=True)
        if state.solved is not None and state.solved[0] == inputs:
            return state.solved[1]
        plan = await asyncio.to_thread(solver.solve_spec, spec, rate)
        state.solved = (inputs, plan)
        trigger = {"SpecChange": "update", "Start": "resume", "Resync": "resume"}.get(
            reason, reason
        )
        metrics.record_plan(*key, plan, _snake(trigger))
        state.rate.solved_rate = plan.total_rate
        if decide.distribution_model(spec) is not None:
            state.rate.solved_distribution = fitted
            work.status["solvedDistribution"] = fitted  # None deletes: the spec's own matrix
        if plan.solved:
            work.status.update(decide.plan_status(plan, now))
        else:
            work.status["planStatus"] = plan.status
        return plan

    # -- the node pools

    async def _scope(self, ref: api.ObjectReference) -> tuple[str, bool]:
        kind = (ref.group, ref.kind)
        if kind not in self._scopes:
            self._scopes[kind] = await asyncio.to_thread(self.kube.scope, ref)
        return self._scopes[kind]

    async def _target_key(self, namespace: str, ref: api.ObjectReference) -> decide.TargetKey:
        _, namespaced = await self._scope(ref)
        return (namespace if namespaced else "", ref.group, ref.kind, ref.name)

    async def _claims(self, key: Key) -> list[decide.Claim]:
        """Every other allocation's claim on its targets, from the specs as they are stored."""
        claims = []
        for other in list(self.bodies):
            if other == key:
                continue
            body = self._latest(other)
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

    async def _scale(
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
            mine.append(await self._target_key(namespace, ref))
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
                    asked = record.desired if record is not None and current != want else want
                    records[gpu.name] = decide.PoolRecord(target, asked, current)
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

    # -- the one status write

    async def _finish(
        self,
        key: Key,
        body: Mapping[str, Any],
        state: AllocationState,
        work: Work,
        generation: int,
        now: datetime,
        trigger: str,
        retry: bool = False,
    ) -> None:
        namespace, name = key
        before = [
            c
            for c in work.status.get("conditions") or ()
            if not (isinstance(c, Mapping) and c.get("type") in work.dropped)
        ]
        work.status["conditions"] = conditions.set_conditions(before, work.updates, generation, now)
        work.status["observedGeneration"] = generation
        ready = next((c for c in work.updates if c.type == conditions.READY), None)
        if ready is not None and conditions.transitioned(state.status.get("conditions"), ready):
            work.events.append(condition_event(ready))
        changed = {k: v for k, v in work.status.items() if state.status.get(k) != v}
        changed.update({k: None for k in state.status if k not in work.status})
        if changed:
            await asyncio.to_thread(self.kube.patch_status, namespace, name, changed)
        state.status = {k: v for k, v in work.status.items() if v is not None}
        state.generation = generation
        if ready is not None:
            log.info(
                "[%s/%s] Reconciled (%s): Ready=%s %s", *key, trigger, ready.status, ready.reason
            )
        if retry:
            state.next_resync = asyncio.get_running_loop().time() + SCALE_RETRY_SECONDS
        for event in work.events:
            try:
                await asyncio.to_thread(
                    self.kube.post_event,
                    namespace,
                    name,
                    body.get("uid"),
                    event.type,
                    event.reason,
                    event.message,
                )
            except NotLeader:
                raise
            except Exception as exc:
                log.warning("[%s/%s] Cannot post an Event: %s", *key, exc)


def _reference(gpu: Any) -> api.ObjectReference | None:
    """The scale target of a stored `gpus[]` entry, when it is well formed."""
    if not isinstance(gpu, Mapping) or not isinstance(gpu.get("scaleTargetRef"), Mapping):
        return None
    try:
        return api.ObjectReference.model_validate(gpu["scaleTargetRef"])
    except ValueError:
        return None


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")
