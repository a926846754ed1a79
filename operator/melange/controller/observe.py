"""Observe an allocation's live signals: the request rate and sizes from Prometheus, and whether
they drifted enough to re-solve (the decisions are `signals.rates` and `signals.distribution`)."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from melange import api
from melange.controller import decide, metrics, urls
from melange.controller.state import (
    AllocationState,
    EventSpec,
    Key,
    Kube,
    Work,
    condition_event,
    transitioned,
)
from melange.signals import distribution, prices, rates
from melange.signals.distribution import Observation
from melange.signals.prometheus import PrometheusClient
from melange.signals.rates import RateError, URLNotAllowed

log = logging.getLogger("melange.controller")


class Observer:
    def __init__(
        self, kube: Kube, prometheus: PrometheusClient, allowed_urls: tuple[urls.Prefix, ...] = ()
    ) -> None:
        self.kube = kube
        self.prometheus = prometheus
        self.allowed_urls = allowed_urls

    async def observe(
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
        activation: asyncio.Task[float | None] | None = None
        observed: float | None = None
        error: RateError | None = None
        try:
            token, ca = await self._access(namespace, source)
            activation = asyncio.create_task(self._activation(source, token, ca))
            observed, observation = await asyncio.gather(
                self.prometheus.query_rate(
                    source.prometheus.url,
                    decide.rate_query(source),
                    bearer_token=token,
                    ca_pem=ca,
                    timeout=decide.query_timeout(source),
                    samples=decide.rate_samples(source),
                ),
                self.observe_distribution(spec, token, ca),
            )
        except RateError as exc:
            error = exc
        state.rate.activation = await activation if activation is not None else None
        work.status["observedActivation"] = state.rate.activation
        metrics.record_rate_query(
            namespace, name, "ok" if error is None else error.reason, observed
        )
        rate_state = state.rate
        if error is not None:
            condition = decide.rate_failed(error)
            if transitioned(rate_state.condition, condition):
                log.warning("[%s/%s] No usable rate (%s): %s", *key, error.reason, error.message)
                work.events.append(condition_event(condition))
            rate_state.condition = condition
            rate_state.observed_since = None  # a gap: the window's peak waits to be refilled
            work.status["observedSince"] = None
            return None
        assert observed is not None
        if rate_state.observed_since is None or not decide.consecutive(
            rate_state.last_observed, now, source
        ):
            rate_state.observed_since = now
        decision = rates.decide(
            rate_state.history,
            observed,
            rate_state.solved_rate,
            tolerance=source.drift_tolerance,
            window_seconds=source.scale_down_stabilization_seconds,
            now=now,
            first_observation=not rate_state.observed_before,
            observed_since=rate_state.observed_since,
        )
        condition = decide.rate_observed(observed, source.prometheus.url)
        if transitioned(rate_state.condition, condition):
            log.info("[%s/%s] Rate observed: %s", *key, condition.message)
            work.events.append(condition_event(condition))
        rate_state.condition = condition
        rate_state.history = list(decision.history)
        rate_state.observed_before = True
        rate_state.last_observed = now
        work.status.update(
            decide.observation_status(observed, now, rate_state.observed_since, decision.history)
        )
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

    async def observe_distribution(
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
        if transitioned(state.rate.distribution_condition, condition):
            log.info("[%s/%s] Distribution: %s", *key, condition.message)
            work.events.append(condition_event(condition))
        state.rate.distribution_condition = condition
        return moved

    async def observe_prices(
        self, key: Key, spec: api.AllocationSpec, state: AllocationState, work: Work, now: datetime
    ) -> prices.PriceDecision | None:
        """Read each priced type's source; the prices to solve with (None: no type has one)."""
        namespace = key[0]
        sourced = [g for g in spec.gpus if g.cost_per_hour_from is not None]
        if not sourced:
            return None
        names = {g.name: prices.source_name(g) or "spec" for g in sourced}
        access: tuple[str | None, str | None] | RateError | None = None
        if spec.rate_source is not None and any(
            g.cost_per_hour_from and g.cost_per_hour_from.prometheus_query for g in sourced
        ):
            try:  # once for every price query
                access = await self._access(namespace, spec.rate_source)
            except RateError as exc:
                access = exc
        read: dict[str, float | RateError] = {}
        answers = await asyncio.gather(
            *(self._price(namespace, spec.rate_source, g, access) for g in sourced),
            return_exceptions=True,
        )
        for gpu, answer in zip(sourced, answers, strict=True):
            if isinstance(answer, RateError | float):
                read[gpu.name] = answer
            elif isinstance(answer, BaseException):
                raise answer
        decision = prices.decide(
            prices.in_effect(spec, work.status), read, spec.price_tolerance, now, names
        )
        condition = decide.prices_condition(decision, read)
        if transitioned(state.prices_condition, condition):
            log.info("[%s/%s] Prices: %s", *key, condition.message)
            work.events.append(condition_event(condition))
        state.prices_condition = condition
        if decision.changed:
            message = "; ".join(
                f"{n} {decision.prices[n].cost_per_hour:g}/h ({decision.prices[n].source})"
                for n in decision.changed
            )
            log.info("[%s/%s] Price change: %s", *key, message)
            work.events.append(EventSpec("Normal", "PriceChange", f"re-solving: {message}"))
        return decision

    async def _access(
        self, namespace: str, source: api.RateSource
    ) -> tuple[str | None, str | None]:
        """The rate source's bearer token and CA, once its URL is allowed (checked before any
        credential is read); a refusal or an unreadable credential as a `RateError`."""
        refused = urls.refusal(
            source.prometheus.url,
            self.allowed_urls,
            sends_token=source.prometheus.bearer_token_secret_ref is not None,
        )
        if refused is not None:
            raise URLNotAllowed(refused)
        return await asyncio.to_thread(self.kube.credentials, namespace, source.prometheus)

    async def _price(
        self,
        namespace: str,
        rate_source: api.RateSource | None,
        gpu: api.GpuType,
        access: tuple[str | None, str | None] | RateError | None,
    ) -> float:
        """One type's price: from its ConfigMap, or its query against the rate source's
        Prometheus with the credentials `access` read for all of them."""
        source = gpu.cost_per_hour_from
        assert source is not None
        what = f"the price of {gpu.name}"
        try:
            if source.config_map_key_ref is not None:
                text = await asyncio.to_thread(
                    self.kube.price, namespace, source.config_map_key_ref
                )
                return prices.parse_price(
                    text, f"{what} (ConfigMap key {source.config_map_key_ref.key})"
                )
            assert rate_source is not None  # checked by the spec's own rules
            assert source.prometheus_query is not None
            assert access is not None
            if isinstance(access, RateError):
                raise access
            token, ca = access
            status, body, url, kind = await self.prometheus.query(
                rate_source.prometheus.url,
                source.prometheus_query,
                bearer_token=token,
                ca_pem=ca,
                timeout=decide.query_timeout(rate_source),
            )
            return prices.parse_price_response(status, body, url, content_type=kind)
        except RateError as exc:
            raise type(exc)(f"{what}: {exc.message}") from None

    async def _activation(
        self, source: api.RateSource, token: str | None, ca: str | None
    ) -> float | None:
        """What the activation query reads; None when there is none or it fails (a failure never
        wakes an allocation: missing data moves no pool)."""
        query = source.prometheus.activation_query
        if query is None:
            return None
        try:
            return await self.prometheus.query_rate(
                source.prometheus.url,
                query,
                bearer_token=token,
                ca_pem=ca,
                timeout=decide.query_timeout(source),
            )
        except RateError as exc:
            log.warning("The activation query failed (%s): %s", exc.reason, exc.message)
            return None
