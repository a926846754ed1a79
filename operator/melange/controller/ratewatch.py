"""The rate loop: polls each allocation's rate source when due and re-solves on drift.

No Kopf timer or daemon (they would put a finalizer on allocations): the allocations with a rate
source are kept in a Kopf index, and one background task, started and stopped by the handlers, polls
each of them when its `intervalSeconds` is due. A re-solve goes through `reconcile_core`, and the
loop writes the status through the /status subresource and posts Events through the core API.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from melange import api
from melange.api import conditions
from melange.api.conditions import Condition
from melange.controller import decide, metrics
from melange.controller.kube.scale import MERGE_PATCH, new_api_client
from melange.controller.reconciler import EventSpec, Reconciled, condition_event, reconcile_core
from melange.signals import distribution, rates
from melange.signals.distribution import Observation
from melange.signals.prometheus import PrometheusClient
from melange.signals.rates import CredentialsUnavailable, RateError

GROUP, VERSION, PLURAL = api.API_GROUP, api.API_VERSION, "melangeallocations"
COMPONENT = "melange-operator"
TICK_SECONDS = 1.0
MAX_CONCURRENT_POLLS = 16
STOP_GRACE_SECONDS = 10.0

Key = tuple[str, str]  # (namespace, name)
log = logging.getLogger("melange.signals.rates")


class _ObjectLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes messages with the object, as Kopf's per-object loggers do."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['object'] if self.extra else ''}] {msg}", kwargs


@dataclass
class RateState:
    """What the operator knows about one allocation's rate; seeded from its status, then kept here.

    The in-memory copy is the freshest (a status write takes a moment to come back on the watch);
    the status is its persisted form, from which a restarted operator resumes.
    """

    uid: str | None
    history: list[rates.RateSample]
    solved_rate: float | None  # the rate the current plan was solved for
    observed_before: bool  # any observation yet (else the plan follows spec.workload.totalRate)
    condition: Condition | None  # the current RateObserved condition
    # The distribution the plan was solved for (None: the spec's own), when the spec follows it.
    solved_distribution: list[list[float]] | None = None
    distribution_condition: Condition | None = None  # the current DistributionObserved
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    next_poll: float = 0.0  # event-loop time
    task: asyncio.Task[None] | None = None
    retry: bool = False  # the last rate re-solve could not patch every node pool
    polled_source: Any = None  # spec.rateSource as last polled: a change is polled at once
    # The status as this operator last meant it, field by field (None: deleted). Kopf writes a
    # handler's status after the handler returns, so a poll can land in between; each poll puts
    # back whatever the stored status lost, so both writers converge within one interval.
    written: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_status(cls, uid: str | None, status: Mapping[str, Any]) -> RateState:
        solved = status.get("solvedRate")
        matrix = status.get("solvedDistribution")
        return cls(
            uid=uid,
            history=rates.history_from_status(status.get("rateHistory")),
            solved_rate=float(solved) if isinstance(solved, int | float) else None,
            observed_before=status.get("lastObservationTime") is not None,
            condition=_stored_condition(status, conditions.RATE_OBSERVED),
            solved_distribution=matrix if isinstance(matrix, list) else None,
            distribution_condition=_stored_condition(status, conditions.DISTRIBUTION_OBSERVED),
        )

    def plan_rate(self) -> float | None:
        """The rate to solve for on a spec change: the decided one, once there was an observation."""
        return self.solved_rate if self.observed_before else None

    def plan_distribution(self) -> list[list[float]] | None:
        """The distribution to solve for on a spec change: the last one re-solved for, if any."""
        return self.solved_distribution

    def view(self, stored: Mapping[str, Any]) -> dict[str, Any]:
        """The status to build on: what is stored, overlaid with what was written since."""
        return {**stored, **self.written}

    def record(self, result: Reconciled) -> None:
        self.written.update(result.status)
        if result.solved_rate is not None:
            self.solved_rate = result.solved_rate
        if "solvedDistribution" in result.status:
            self.solved_distribution = result.status["solvedDistribution"]

    def repairs(self, stored: Mapping[str, Any]) -> dict[str, Any]:
        """The fields whose stored value is not the one this operator last wrote."""
        return {k: v for k, v in self.written.items() if stored.get(k) != v}


def _stored_condition(status: Mapping[str, Any], kind: str) -> Condition | None:
    found = conditions.find(status.get("conditions"), kind)
    if found is None or found.get("status") not in {"True", "False", "Unknown"}:
        return None
    return Condition(
        kind, found["status"], str(found.get("reason", "")), str(found.get("message", ""))
    )


def _transitioned(before: Condition | None, after: Condition) -> bool:
    return before is None or (before.status, before.reason) != (after.status, after.reason)


class KubeIO:
    """The loop's own Kubernetes calls (blocking; run in worker threads)."""

    def __init__(self, api_client: k8s.ApiClient) -> None:
        self.core = k8s.CoreV1Api(api_client)
        self.custom = k8s.CustomObjectsApi(api_client)

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": dict(status)},
            _content_type=MERGE_PATCH,
        )

    def post_event(self, namespace: str, name: str, uid: str | None, event: EventSpec) -> None:
        now = datetime.now(UTC).isoformat()
        body = {
            "metadata": {"generateName": "melange-", "namespace": namespace},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": api.KIND,
                "name": name,
                "namespace": namespace,
                "uid": uid,
            },
            "type": event.type,
            "reason": event.reason,
            "message": event.message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": os.environ.get("HOSTNAME", COMPONENT),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        event_object = k8s.CoreV1Event.from_dict(body)
        assert event_object is not None
        self.core.create_namespaced_event(namespace, event_object)

    def _read(self, kind: str, namespace: str, ref: api.SecretKeyRef) -> str:
        where = f"{kind} {namespace}/{ref.name}"
        data: Mapping[str, Any]
        try:
            if kind == "Secret":
                data = self.core.read_namespaced_secret(ref.name, namespace).data or {}
            else:
                data = self.core.read_namespaced_config_map(ref.name, namespace).data or {}
        except ApiException as exc:
            reason = {404: "not found", 403: "forbidden (RBAC)"}.get(exc.status or 0, exc.reason)
            raise CredentialsUnavailable(f"{where}: {reason}") from None
        if ref.key not in data:
            raise CredentialsUnavailable(f"{where} has no key {ref.key!r}")
        value = data[ref.key]
        try:
            if kind == "Secret" and isinstance(value, str):  # the API's base64 form
                value = base64.b64decode(value, validate=True)
            text = value.decode() if isinstance(value, bytes) else str(value)
        except (binascii.Error, UnicodeDecodeError):
            raise CredentialsUnavailable(f"{where}: key {ref.key!r} is not text") from None
        return text.strip()

    def credentials(
        self, namespace: str, source: api.PrometheusSource
    ) -> tuple[str | None, str | None]:
        """The bearer token and the CA bundle the spec names, read fresh (tokens rotate)."""
        token = ca = None
        if source.bearer_token_secret_ref is not None:
            token = self._read("Secret", namespace, source.bearer_token_secret_ref)
        if source.ca_config_map_ref is not None:
            ca = self._read("ConfigMap", namespace, source.ca_config_map_ref)
        return token, ca


def _interval(spec: Mapping[str, Any]) -> float:
    raw = (spec.get("rateSource") or {}).get("intervalSeconds", 30)
    return float(min(max(raw if isinstance(raw, int) else 30, 5), 3600))


class RateRuntime:
    """One background task: every second, poll each allocation whose interval is due."""

    def __init__(self, index: kopf.Index[Key, dict[str, Any]], memo: kopf.Memo) -> None:
        self.index = index
        self.memo = memo
        self.states: dict[Key, RateState] = {}
        self.client = PrometheusClient()
        self._kube: KubeIO | None = None
        self._task: asyncio.Task[None] | None = None
        self._semaphore = asyncio.Semaphore(MAX_CONCURRENT_POLLS)

    # -- life cycle

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="melange rate loop")

    async def stop(self) -> None:
        """Stop polling; let polls in flight finish (a re-solve writes its status), then close."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        polls = {s.task for s in self.states.values() if s.task is not None and not s.task.done()}
        if polls:
            _, pending = await asyncio.wait(polls, timeout=STOP_GRACE_SECONDS)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.client.close()

    async def _run(self) -> None:
        while True:
            try:
                self._tick()
            except Exception:
                log.exception("The rate loop's tick failed; trying again")
            await asyncio.sleep(TICK_SECONDS)

    def _latest(self, key: Key) -> dict[str, Any] | None:
        store = self.index.get(key)
        return next(iter(store), None) if store is not None else None

    def state_for(self, key: Key, body: Mapping[str, Any]) -> RateState | None:
        """The allocation's state when it has a rate source (seeded from its status), else None."""
        spec = body.get("spec") or {}
        if not isinstance(spec.get("rateSource"), Mapping):
            self.forget(key)
            return None
        uid = (body.get("metadata") or {}).get("uid") or body.get("uid")
        state = self.states.get(key)
        if state is None or state.uid != uid:  # new, or deleted and created again
            state = RateState.from_status(uid, body.get("status") or {})
            self.states[key] = state
        return state

    def forget(self, key: Key) -> None:
        if self.states.pop(key, None) is not None:
            metrics.forget_rate_source(*key)

    def _tick(self) -> None:
        now = asyncio.get_running_loop().time()
        seen = set()
        for key, store in list(self.index.items()):
            body = next(iter(store), None)
            if body is None:
                continue
            seen.add(key)
            state = self.state_for(key, body)
            if state is None or (state.task is not None and not state.task.done()):
                continue
            source = body["spec"].get("rateSource")
            if now >= state.next_poll or source != state.polled_source:
                state.polled_source = source
                state.next_poll = now + _interval(body["spec"])
                state.task = asyncio.create_task(self._poll(key, state), name=f"rate {key}")
        for key in [k for k, s in self.states.items() if k not in seen]:
            task = self.states[key].task
            if task is None or task.done():
                self.forget(key)

    def _kube_io(self) -> KubeIO:
        if self._kube is None:
            self._kube = KubeIO(new_api_client(os.environ.get("KUBECONFIG")))
        return self._kube

    # -- one poll

    async def _poll(self, key: Key, state: RateState) -> None:
        try:
            async with self._semaphore:
                await self._poll_once(key, state)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("[%s/%s] Polling the rate source failed", *key)

    async def _poll_once(self, key: Key, state: RateState) -> None:
        namespace, name = key
        body = self._latest(key)
        if body is None:
            return
        try:
            parsed = api.validate_spec(body["spec"])
        except api.SpecError:
            return  # the handlers report it (Ready=False, InvalidSpec)
        source = parsed.rate_source
        if source is None or decide.operator_errors(parsed):
            return
        observation: Observation | RateError | None = None
        try:
            token, ca = await asyncio.to_thread(
                self._kube_io().credentials, namespace, source.prometheus
            )
            observed: float | None
            observed, observation = await asyncio.gather(
                self.client.query_rate(
                    source.prometheus.url,
                    decide.rate_query(source),
                    bearer_token=token,
                    ca_pem=ca,
                    timeout=decide.query_timeout(source),
                ),
                self._observe_distribution(parsed, token, ca),
            )
            error: RateError | None = None
        except RateError as exc:
            observed, error = None, exc
        metrics.record_rate_query(
            namespace, name, "ok" if error is None else error.reason, observed
        )
        async with state.lock:
            body = self._latest(key)  # the status may have changed while the query ran
            if body is None or body.get("uid") != state.uid or self.states.get(key) is not state:
                return
            now = datetime.now(UTC).replace(microsecond=0)
            if error is not None:
                await self._failed(key, body, state, error, now)
            else:
                assert observed is not None
                await self._observed(key, body, state, parsed, observed, observation, now)

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
            prompt, generation = await self.client.token_histograms(
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

    async def _failed(
        self, key: Key, body: Mapping[str, Any], state: RateState, error: RateError, now: datetime
    ) -> None:
        """Keep the plan and the node pools; say why, once (no write while nothing changes)."""
        condition = decide.rate_failed(error)
        events = []
        if _transitioned(state.condition, condition):
            log.warning("[%s/%s] No usable rate (%s): %s", *key, error.reason, error.message)
            events.append(condition_event(condition))
        elif condition == state.condition:
            log.debug("[%s/%s] Rate source still failing: %s", *key, error.message)
        if condition != state.condition:
            base = state.view(body["status"]).get("conditions")
            state.written["conditions"] = conditions.set_conditions(
                base, [condition], body["generation"], now
            )
            state.condition = condition
        status = state.repairs(body["status"])
        if status or events:
            await self._write(key, body, status, events)

    async def _observed(
        self,
        key: Key,
        body: Mapping[str, Any],
        state: RateState,
        spec: api.AllocationSpec,
        observed: float,
        observation: Observation | RateError | None,
        now: datetime,
    ) -> None:
        namespace, name = key
        source = spec.rate_source
        assert source is not None
        decision = rates.decide(
            state.history,
            observed,
            state.solved_rate,
            tolerance=source.drift_tolerance,
            window_seconds=source.scale_down_stabilization_seconds,
            now=now,
            first_observation=not state.observed_before,
        )
        condition = decide.rate_observed(observed, source.prometheus.url)
        events = []
        if _transitioned(state.condition, condition):
            log.info("[%s/%s] Rate observed: %s", *key, condition.message)
            events.append(condition_event(condition))
        status = decide.observation_status(observed, now, decision.history)
        state.history = list(decision.history)
        state.observed_before = True
        state.condition = condition
        moved = self._distribution(key, state, spec, observation, status, events)
        rate = decision.rate if decision.resolve else state.solved_rate
        shape = moved is not None and moved.resolve
        if decision.resolve or shape or (state.retry and rate is not None):
            if decision.resolve:
                log.info("[%s/%s] Rate drift: %s", *key, decision.message)
                events.append(EventSpec("Normal", "RateDrift", decision.message))
            result = await reconcile_core(
                namespace=namespace,
                name=name,
                raw_spec=body["spec"],
                status=state.view(body["status"]),
                generation=body["generation"],
                trigger="distribution_drift" if shape and not decision.resolve else "rate_drift",
                scaler=self.memo["scaler"],
                logger=_ObjectLogger(log, {"object": f"{namespace}/{name}"}),
                now=now,
                rate=rate,
                rate_condition=condition,
                distribution=(
                    observation.matrix
                    if shape and isinstance(observation, Observation)
                    else state.plan_distribution()
                ),
                distribution_condition=state.distribution_condition,
            )
            state.record(result)
            events += result.events
            state.retry = bool(result.failed)
        else:
            log.debug("[%s/%s] %s", *key, decision.message)
            current = [condition]
            if state.distribution_condition is not None and observation is not None:
                current.append(state.distribution_condition)
            state.written["conditions"] = conditions.set_conditions(
                state.view(body["status"]).get("conditions"),
                current,
                body["generation"],
                now,
            )
        state.written.update(status)
        await self._write(key, body, {**state.repairs(body["status"]), **status}, events)

    def _distribution(
        self,
        key: Key,
        state: RateState,
        spec: api.AllocationSpec,
        observation: Observation | RateError | None,
        status: dict[str, Any],
        events: list[EventSpec],
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
                distribution.fitting(state.solved_distribution, spec.buckets)
                or spec.workload.distribution
            )
            moved = distribution.drift(solved, observation.matrix, follow.drift_tolerance)
            condition = decide.distribution_observed(
                observation.summary(follow.window_seconds), moved.distance
            )
            metrics.record_distribution_distance(*key, moved.distance)
            status.update(distribution.observation_status(observation, moved.distance))
            if moved.resolve:
                changes = distribution.describe_largest_moves(
                    solved,
                    observation.matrix,
                    (spec.buckets.input_tokens, spec.buckets.output_tokens),
                )
                message = moved.message + (f" (largest: {changes})" if changes else "")
                log.info("[%s/%s] Distribution drift: %s", *key, message)
                events.append(EventSpec("Normal", "DistributionDrift", message))
        if _transitioned(state.distribution_condition, condition):
            log.info("[%s/%s] Distribution: %s", *key, condition.message)
            events.append(condition_event(condition))
        state.distribution_condition = condition
        return moved

    async def _write(
        self,
        key: Key,
        body: Mapping[str, Any],
        status: Mapping[str, Any],
        events: Sequence[EventSpec],
    ) -> None:
        namespace, name = key
        kube = self._kube_io()
        try:
            await asyncio.to_thread(kube.patch_status, namespace, name, status)
        except ApiException as exc:
            if exc.status == 404:
                self.forget(key)
                return
            log.warning("[%s/%s] Cannot write the status: %s", *key, exc.reason)
        for event in events:
            try:
                await asyncio.to_thread(kube.post_event, namespace, name, body.get("uid"), event)
            except ApiException as exc:
                log.warning("[%s/%s] Cannot post an Event: %s", *key, exc.reason)
