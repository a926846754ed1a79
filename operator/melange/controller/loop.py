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
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from melange import api
from melange.api import conditions
from melange.controller import choose, decide, metrics, routing
from melange.controller.errors import NotLeader, PublishError, StatusGone
from melange.controller.observe import Observer
from melange.controller.pools import Pools
from melange.controller.settings import Settings
from melange.controller.state import (
    AllocationState,
    EventSpec,
    Key,
    Kube,
    RateState,
    Work,
    condition_event,
)
from melange.plan.result import Plan
from melange.signals import distribution, prices
from melange.signals.prometheus import PrometheusClient

TICK_SECONDS = 1.0
SCALE_RETRY_SECONDS = 15.0
# While pools are on their way to the plan (spec.transition), their readiness is read this often.
TRANSITION_POLL_SECONDS = 5.0
INTERNAL_ERROR = "InternalError"
MAX_ERROR_MESSAGE = 200  # characters of an unexpected failure's one-line message
MAX_CONCURRENT = 16
STOP_GRACE_SECONDS = 10.0
SYNC_INTERVAL_SECONDS = 0.5  # how often the view is compared with a LIST until it holds it all
SYNC_RETRY_MAX_SECONDS = 30.0  # the longest wait between LISTs that fail

log = logging.getLogger("melange.controller")
# why a plan was solved (the reason patches carry) -> the `trigger` label of melange_solves_total
SOLVE_TRIGGERS = {
    "Create": "create",
    "Resume": "resume",
    "SpecChange": "update",
    "Resync": "resume",
    "RateDrift": "rate_drift",
    "DistributionDrift": "distribution_drift",
    "PriceChange": "price_change",
    "Activation": "activation",
}


def failure_message(exc: BaseException) -> str:
    """An unexpected failure in one line: its type and message, cut to MAX_ERROR_MESSAGE."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    if len(text) > MAX_ERROR_MESSAGE:
        text = text[: MAX_ERROR_MESSAGE - 3] + "..."
    return text


def _claim_identity(body: Mapping[str, Any]) -> tuple[Any, ...]:
    """What an allocation's claim on its node pools is made of (its rank and its targets)."""
    return body.get("uid"), body.get("created"), body["spec"].get("gpus")


def _poll_interval(spec: Mapping[str, Any]) -> float:
    raw = (spec.get("rateSource") or {}).get("intervalSeconds", 30)
    return float(min(max(raw if isinstance(raw, int) else 30, 5), 3600))


def _interval(spec: Mapping[str, Any], settings: Settings) -> float:
    """Seconds between an allocation's regular reconciles: its poll interval, else the resync."""
    if isinstance(spec.get("rateSource"), Mapping):
        return _poll_interval(spec)
    return float(settings.resync_seconds)


class Controller:
    def __init__(
        self,
        kube: Kube,
        leading: Callable[[], bool],
        settings: Settings | None = None,
        prometheus: PrometheusClient | None = None,
    ) -> None:
        self.bodies: dict[Key, dict[str, Any]] = {}  # every allocation as last seen on the watch
        self.kube = kube
        self.leading = leading
        self.settings = settings or Settings()
        self.prometheus = prometheus or PrometheusClient()
        self.states: dict[Key, AllocationState] = {}
        self.observer = Observer(kube, self.prometheus, self.settings.allow_prometheus_urls)
        self.pools = Pools(kube, self.settings, self.bodies)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._view_task: asyncio.Task[None] | None = None
        self._semaphore = asyncio.Semaphore(MAX_CONCURRENT)
        # per allocation and GPU type, the replicas it holds (for the cluster's GPU budgets)
        self.asked: dict[Key, dict[str, int]] = {}
        self._budget_lock = asyncio.Lock()
        self._synced = asyncio.Event()  # the watch has shown every allocation there was
        self.on_synced: Callable[[], None] = lambda: None

    # -- life cycle

    def start(self) -> None:
        self._view_task = asyncio.create_task(self._keep_view(), name="melange view")
        self._task = asyncio.create_task(self._run(), name="melange controller")

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def wake(self) -> None:
        self._wake.set()

    def observe(self, key: Key, body: dict[str, Any] | None) -> None:
        """An allocation as the watch stream shows it now (None: deleted); due ones run at once."""
        before = self.bodies.get(key)
        if body is None:
            self.bodies.pop(key, None)
        else:
            self.bodies[key] = body
        if before is None or body is None or _claim_identity(before) != _claim_identity(body):
            self.pools.claims_changed()
        self.wake()

    def leadership_changed(self, leading: bool) -> None:
        """Drop what this replica knew: as the new leader, start again from the stored status.

        Reconciles in flight are cancelled, so none of them outlives the term it started in.
        """
        metrics.record_leader(leading)
        for state in self.states.values():
            if state.task is not None:
                state.task.cancel()
        for key in list(self.states):
            self.forget(key)  # a standby's gauges would go stale
        self.states.clear()
        self.wake()

    async def stop(self) -> None:
        """Stop; let reconciles in flight finish (they write their status), then close."""
        tasks = [t for t in (self._view_task, self._task) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        running = {s.task for s in self.states.values() if s.task is not None and not s.task.done()}
        if running:
            _, pending = await asyncio.wait(running, timeout=STOP_GRACE_SECONDS)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.prometheus.close()

    async def _list(self) -> set[tuple[Key, str]] | None:
        """Every allocation the API server holds now, as (key, uid); None when it cannot say."""
        try:
            listed = await asyncio.to_thread(self.kube.list_allocations, self.settings.namespaces)
        except Exception as exc:  # the API server's answer, or none: asked again later
            log.warning("Cannot list the allocations: %s", failure_message(exc))
            return None
        return {((namespace, name), uid) for namespace, name, uid in listed}

    async def _keep_view(self) -> None:
        """The watch's view of the allocations, checked against a LIST: whole before anything
        acts, then once per resync interval for deletions the watch did not show."""
        failures = 0
        while True:
            listed = await self._list()
            if listed is not None:
                failures = 0
                missing = [key for key, uid in listed if self._uid(key) != uid]
                if not missing:
                    break
                log.debug("Waiting for %d allocations to be seen on the watch", len(missing))
            else:
                failures += 1  # a LIST that fails is asked again less and less often
            await asyncio.sleep(min(SYNC_INTERVAL_SECONDS * 2**failures, SYNC_RETRY_MAX_SECONDS))
        self._synced.set()
        log.info("The watch shows every allocation (%d); reconciling", len(listed))
        self.on_synced()
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            await self._forget_the_gone()

    def _uid(self, key: Key) -> str | None:
        body = self.bodies.get(key)
        return None if body is None else body.get("uid")

    async def _forget_the_gone(self) -> None:
        """Drop the allocations a LIST no longer shows. After a gap in the watch (an expired
        resourceVersion: it lists again) a deletion in the gap has no DELETED event, and a ghost
        would keep its claim on pools and its share of a GPU budget. Only those seen before the
        LIST began are judged by it: one created since may be missing from it, not gone."""
        before = {key: self._uid(key) for key in list(self.bodies)}
        listed = await self._list()
        if listed is None:
            return
        for key, uid in before.items():
            if (key, uid) not in listed and self._uid(key) == uid:
                log.warning(
                    "[%s/%s] Gone from the API server, though the watch did not show its "
                    "deletion; forgotten",
                    *key,
                )
                self.observe(key, None)

    async def _run(self) -> None:
        await self._synced.wait()
        while True:
            try:
                self._tick()
            except Exception:
                log.exception("The controller's tick failed; trying again")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_SECONDS)

    def _tick(self) -> None:
        if not self.leading():
            return
        now = asyncio.get_running_loop().time()
        seen = set()
        for key, body in list(self.bodies.items()):
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
                state.next_poll = now + _poll_interval(spec)
            state.next_resync = now + _interval(spec, self.settings)
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

    @staticmethod
    def _activated(spec: api.AllocationSpec, state: AllocationState, plan: Plan) -> bool:
        """Requests wait (the activation query reads above 0) and the plan has no replica: wake
        the allocation at the rate it was written for."""
        source = spec.rate_source
        return (
            source is not None
            and source.prometheus.activation_query is not None
            and (state.rate.activation or 0.0) > 0
            and plan.solved
            and not any(g.replicas for g in plan.gpus)
            and spec.workload.total_rate > 0
        )

    def _budget_left(self, key: Key, spec: api.AllocationSpec) -> dict[str, int]:
        """Per budgeted type of this allocation, what the others leave of the cluster's budget."""
        budgets = self.settings.gpu_budgets
        used = {g.name: 0 for g in spec.gpus if g.name in budgets}
        for other, body in list(self.bodies.items()):
            if other == key:
                continue
            held = self.asked.get(other)
            if held is None:  # not reconciled by this replica yet: what its status says it holds
                held = decide.asked_counts(body.get("status") or {})
            for name in used:
                used[name] += held.get(name, 0)
        return {name: max(budgets[name] - count, 0) for name, count in used.items()}

    def forget(self, key: Key) -> None:
        self.asked.pop(key, None)
        state = self.states.pop(key, None)
        if state is not None:
            gpus = [
                g.get("name", "") for g in state.status.get("gpus") or [] if isinstance(g, dict)
            ]
            metrics.forget(*key, gpus)
            metrics.forget_rate_source(*key)
            metrics.forget_state(*key)

    async def _settle(self, key: Key, work: Awaitable[None], lost: str) -> Exception | None:
        """Run a reconcile or a status write. Losing the Lease (`lost` says what that left
        undone) or the allocation ends it quietly; any other failure is returned."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except NotLeader:
            log.info("[%s/%s] Lost the Lease: %s", *key, lost)
        except StatusGone:
            self.forget(key)
        except Exception as exc:
            return exc
        return None

    async def _guarded(self, key: Key, state: AllocationState, trigger: str, poll: bool) -> None:
        async with self._semaphore:
            failed = await self._settle(
                key,
                self.reconcile(key, state, trigger, poll),
                "the reconcile stopped before writing",
            )
        if failed is None:
            return
        # Not at once (no hot loop on a persistent failure): after a pause, as a resync.
        log.error(
            "[%s/%s] Reconcile failed; trying again in %.0f s",
            *key,
            SCALE_RETRY_SECONDS,
            exc_info=failed,
        )
        metrics.record_error(*key, INTERNAL_ERROR)
        await self._report_failure(key, state, failed)
        body = self.bodies.get(key)
        if body is not None:
            state.generation = int(body["generation"])
        state.next_resync = asyncio.get_running_loop().time() + SCALE_RETRY_SECONDS

    async def _report_failure(self, key: Key, state: AllocationState, exc: Exception) -> None:
        """Say in the status that the reconcile failed (Ready=False, InternalError; a Warning Event
        when Ready turns so), through the one status write. When that write is what fails, the
        log says so and the retry after the pause tries again."""
        body = self.bodies.get(key)
        if body is None or body.get("uid") != state.uid:
            return
        ready = conditions.Condition(
            conditions.READY, "False", INTERNAL_ERROR, failure_message(exc)
        )
        work = Work(status=dict(state.status), updates=[ready])
        now = datetime.now(UTC).replace(microsecond=0)
        write = self._finish(key, body, state, work, int(body["generation"]), now, "failure")
        failed = await self._settle(key, write, "the failure is not reported")
        if failed is not None:
            log.warning(
                "[%s/%s] Cannot report the failure in the status: %s", *key, failure_message(failed)
            )

    # -- one reconcile

    async def reconcile(self, key: Key, state: AllocationState, trigger: str, poll: bool) -> None:
        namespace, name = key
        body = self.bodies.get(key)
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
            drift = await self.observer.observe(key, spec, state, work, now)
            if drift is not None:
                reason, rate, matrix = drift
        priced = await self.observer.observe_prices(key, spec, state, work, now)
        if priced is None:
            work.dropped.append(conditions.PRICES_OBSERVED)
            work.status["prices"] = None
            state.prices_condition = None
        else:
            if state.prices_condition is not None:
                work.updates.append(state.prices_condition)
            if priced.changed and reason == "Resync":
                reason = "PriceChange"
            spec = prices.priced_spec(spec, priced.prices)
        if spec.rate_source is not None and state.rate.condition is not None:
            work.updates.append(state.rate.condition)
        if follows and state.rate.distribution_condition is not None:
            work.updates.append(state.rate.distribution_condition)

        budgeted = any(g.name in self.settings.gpu_budgets for g in spec.gpus)
        if not budgeted:
            work.dropped.append(conditions.BUDGET_LIMITED)
        # Allocations that share a budget plan and scale one at a time, each within what the
        # others hold, so that together they never ask for more than the budget.
        async with self._budget_lock if budgeted else contextlib.nullcontext():
            left = self._budget_left(key, spec) if budgeted else None
            plan = await self._solve(
                key, spec, state, work, rate, matrix, reason, now, generation, left
            )
            woken = self._activated(spec, state, plan)
            if woken:
                plan = await self._solve(
                    key,
                    spec,
                    state,
                    work,
                    spec.workload.total_rate,
                    matrix,
                    "Activation",
                    now,
                    generation,
                    left,
                )
            if left is not None:
                over = state.choice.over_budget if state.choice is not None else {}
                work.updates.append(decide.budget_condition(over, self.settings.gpu_budgets))
            if priced is not None and plan.solved:
                work.status["prices"] = prices.to_status(priced.prices)
            if not plan.solved:
                log.warning("[%s/%s] No feasible plan, node pools left as they are", *key)
                metrics.record_error(namespace, name, plan.status)
                work.updates = decide.infeasible_conditions(plan) + work.updates
                await self._finish(key, body, state, work, generation, now, trigger)
                return
            desired = decide.desired_replicas(spec, plan)
            result = await self.pools.scale(
                key, body, spec, desired, reason, work, now, _interval(raw, self.settings)
            )
            if budgeted:
                self.asked[key] = {} if spec.dry_run else decide.asked_counts(work.status)
        await self._publish(key, body, spec, state, work)
        scaled = result.scaled
        note = state.choice.note if state.choice else None
        if woken:
            note = decide.activation_note(state.rate.activation, spec.workload.total_rate, note)
        solved = decide.solved_condition(plan, note)
        work.updates = [*decide.with_ready([solved, scaled]), *result.conditions, *work.updates]
        if spec.transition is None:
            work.dropped.append(conditions.TRANSITIONING)
        if spec.transition is None or spec.transition.capacity_timeout_seconds is None:
            work.dropped.append(conditions.CAPACITY_LIMITED)
        failed = scaled.reason == "ScaleFailed"
        if failed:
            metrics.record_error(namespace, name, "ScaleFailed")
        await self._finish(key, body, state, work, generation, now, trigger, retry=failed)
        if result.caps_changed:
            state.next_resync = 0.0  # re-solve within the new caps at once
        elif result.moving:
            loop_now = asyncio.get_running_loop().time()
            state.next_resync = min(state.next_resync, loop_now + TRANSITION_POLL_SECONDS)

    async def _publish(
        self,
        key: Key,
        body: Mapping[str, Any],
        spec: api.AllocationSpec,
        state: AllocationState,
        work: Work,
    ) -> None:
        """Write the plan's routing table to its ConfigMap (spec.routing.publishConfigMap), or
        remove the one written before once publishing is turned off."""
        namespace, name = key
        wanted = spec.routing is not None and spec.routing.publish_config_map
        written = work.status.get("routingConfigMap")
        if not wanted:
            work.dropped.append(conditions.ROUTING_PUBLISHED)
            if isinstance(written, str) and not spec.dry_run:
                try:
                    await asyncio.to_thread(
                        self.kube.unpublish_routing, namespace, written, str(body.get("uid"))
                    )
                    work.status["routingConfigMap"] = None
                except PublishError as exc:
                    log.warning("[%s/%s] Cannot remove the routing table: %s", *key, exc)
            return
        config_map = routing.config_map_name(name)
        if config_map is None:
            work.updates.append(routing.name_too_long(name))
            return
        if spec.dry_run:
            work.updates.append(
                routing.unpublished("DryRun", "dryRun is set, so no ConfigMap is written")
            )
            return
        if state.routing_document is None:
            work.updates.append(
                routing.unpublished(
                    "NoTable",
                    "no routing table for the current plan (see the operator's log); the "
                    "ConfigMap keeps the last one",
                )
            )
            return
        # Read and compared every reconcile (one GET): an outside edit is set back, as a pool's is.
        owner = {"name": name, "uid": body.get("uid")}
        try:
            changed = await asyncio.to_thread(
                self.kube.publish_routing,
                namespace,
                config_map,
                owner,
                routing.TABLE_KEY,
                state.routing_document,
            )
        except PublishError as exc:
            log.warning("[%s/%s] Routing table not published: %s", *key, exc.message)
            work.updates.append(routing.unpublished(exc.reason, exc.message))
            before = conditions.find(
                state.status.get("conditions") or [], conditions.ROUTING_PUBLISHED
            )
            if exc.reason == "ConfigMapConflict" and (
                before is None or before.get("reason") != exc.reason
            ):  # once, when it starts: not at every reconcile
                work.events.append(EventSpec("Warning", "ConfigMapConflict", exc.message))
            return
        work.status["routingConfigMap"] = config_map
        work.updates.append(routing.published(config_map))
        if changed:
            log.info("[%s/%s] Routing table written to ConfigMap %s", *key, config_map)

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
        generation: int,
        budgets: Mapping[str, int] | None = None,
    ) -> Plan:
        """The plan for this spec, rate and distribution: solved again only when one changed."""
        fitted = distribution.fitting(matrix, spec.buckets) if matrix is not None else None
        if fitted is not None:
            spec = spec.model_copy(
                update={"workload": spec.workload.model_copy(update={"distribution": fitted})}
            )
        mbb = spec.transition
        caps = (
            decide.caps_from_status(work.status)
            if mbb is not None and mbb.capacity_timeout_seconds is not None
            else {}
        )
        current = decide.planned_counts(work.status) if spec.min_savings is not None else None
        # Within one uid, the generation names the spec (every spec change bumps it).
        inputs = (
            generation,
            rate,
            fitted,
            tuple(sorted((n, c.replicas) for n, c in caps.items())),
            tuple(g.cost_per_hour for g in spec.gpus),
            tuple(sorted((budgets or {}).items())),
        )
        if state.solved is not None and state.solved[0] == inputs:
            return state.solved[1]
        choice = await asyncio.to_thread(choose.choose_plan, spec, rate, caps, current, budgets)
        plan = choice.plan
        table, state.routing_document = None, None
        if plan.solved:
            try:
                table = await asyncio.to_thread(routing.table_for, spec, rate, plan, key[0])
            except ValueError as exc:  # the pools still follow the plan; the router keeps its table
                log.warning("[%s/%s] No routing table for the plan: %s", *key, exc)
            else:
                state.routing_document = routing.document(table)  # once per plan
        state.solved = (inputs, plan)
        state.choice = choice
        metrics.record_plan(*key, plan, SOLVE_TRIGGERS[reason])
        metrics.record_saving(*key, plan)
        state.rate.solved_rate = plan.total_rate
        if decide.distribution_model(spec) is not None:
            state.rate.solved_distribution = fitted
            work.status["solvedDistribution"] = fitted  # None deletes: the spec's own matrix
        if plan.solved:
            work.status.update(decide.plan_status(plan, now))
            work.status.update(routing.input_routing_status(table))
        else:
            work.status["planStatus"] = plan.status
        return plan

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
        ready = next(c for c in work.updates if c.type == conditions.READY)  # always derived
        if conditions.transitioned(state.status.get("conditions"), ready):
            work.events.append(condition_event(ready))
        changed = {k: v for k, v in work.status.items() if state.status.get(k) != v}
        if changed:
            await asyncio.to_thread(self.kube.patch_status, namespace, name, changed)
        state.status = {k: v for k, v in work.status.items() if v is not None}
        metrics.record_conditions(namespace, name, state.status.get("conditions") or [])
        state.generation = generation
        log.info("[%s/%s] Reconciled (%s): Ready=%s %s", *key, trigger, ready.status, ready.reason)
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
