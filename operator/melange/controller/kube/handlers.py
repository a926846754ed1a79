"""Kopf handlers: thin glue between the cluster and the reconcile.

When an allocation is created, when its spec changes and when the operator (re)starts, the handler
runs `reconciler.reconcile_core` and Kopf writes the status. Allocations with a `spec.rateSource`
are also kept in a Kopf index for the rate loop (`ratewatch`), started and stopped here.

There are no delete handlers that need one, no timers and no daemons, so Kopf puts no finalizer on
allocations: deleting one never waits for the operator, and leaves the node pools as they are.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any

import kopf

from melange.controller import metrics
from melange.controller.kube.scale import Scaler, new_api_client
from melange.controller.ratewatch import COMPONENT, GROUP, PLURAL, VERSION, Key, RateRuntime
from melange.controller.reconciler import reconcile_core

SCALE_RETRY_SECONDS = 15.0


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Names fixed on day one: changing storage later would make every object look unhandled."""
    settings.persistence.progress_storage = kopf.SmartProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.reporting_component = COMPONENT
    settings.posting.reporting_instance = os.environ.get("HOSTNAME", COMPONENT)
    settings.posting.event_name_prefix = "melange-"
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.watching.connect_timeout = 5
    settings.networking.request_timeout = 30
    # The CRD is installed before the operator (the chart's crds/), and namespaces are named, not
    # patterns: no run-time watching of CRDs and namespaces, so no cluster-wide RBAC for them.
    settings.scanning.disabled = True
    if "scaler" not in memo:
        memo["scaler"] = Scaler(new_api_client(os.environ.get("KUBECONFIG")))


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster service account first, else the kubeconfig; Kopf's own readers, no client library."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def reconcile_allocation(
    body: kopf.Body,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    namespace: str | None,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: kopf.Logger,
    name: str | None,
    reason: Any,
    **_: Any,
) -> None:
    assert namespace is not None  # the CRD is namespaced
    assert name is not None
    runtime: RateRuntime | None = memo.get("rates")
    state = runtime.state_for((namespace, name), body) if runtime is not None else None
    lock: AbstractAsyncContextManager[Any] = (
        state.lock if state is not None else contextlib.nullcontext()
    )
    async with lock:
        result = await reconcile_core(
            namespace=namespace,
            name=name,
            raw_spec=spec,
            status=state.view(status) if state is not None else status,
            generation=int(meta.get("generation") or 0),
            trigger=str(getattr(reason, "value", reason)),
            scaler=memo["scaler"],
            logger=logger,
            now=datetime.now(UTC),
            rate=state.plan_rate() if state is not None else None,
            rate_condition=state.condition if state is not None else None,
            distribution=state.plan_distribution() if state is not None else None,
            distribution_condition=state.distribution_condition if state is not None else None,
        )
        if state is not None:
            state.record(result)
    for key, value in result.status.items():
        patch.status[key] = value
    for event in result.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
    if result.failed:
        raise kopf.TemporaryError(
            "; ".join(f"{o.target}: {o.error}" for o in result.failed), delay=SCALE_RETRY_SECONDS
        )


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def forget_allocation(spec: kopf.Spec, namespace: str | None, name: str | None, **_: Any) -> None:
    """Optional: no finalizer. If the operator misses the deletion, only stale gauges remain."""
    gpus = [g.get("name", "") for g in spec.get("gpus") or [] if isinstance(g, Mapping)]
    metrics.forget(str(namespace), str(name), gpus)


# -- the rate loop --------------------------------------------------------------------------------


def _has_rate_source(spec: kopf.Spec, **_: Any) -> bool:
    return isinstance(spec.get("rateSource"), Mapping)


@kopf.index(GROUP, VERSION, PLURAL, when=_has_rate_source)
def rate_sources(
    body: kopf.Body, namespace: str | None, name: str | None, **_: Any
) -> dict[Key, dict[str, Any]]:
    """Allocations with a rate source, as last seen on the watch stream (spec and status)."""
    return {
        (str(namespace), str(name)): {
            "uid": body.get("metadata", {}).get("uid"),
            "generation": int(body.get("metadata", {}).get("generation") or 0),
            "spec": copy.deepcopy(dict(body.get("spec") or {})),
            "status": copy.deepcopy(dict(body.get("status") or {})),
        }
    }


@kopf.on.startup()
async def start_rate_loop(memo: kopf.Memo, **kwargs: Any) -> None:
    runtime = RateRuntime(kwargs["rate_sources"], memo)  # the index above, by its name
    memo["rates"] = runtime
    runtime.start()


@kopf.on.cleanup()
async def stop_rate_loop(memo: kopf.Memo, **_: Any) -> None:
    runtime: RateRuntime | None = memo.get("rates")
    if runtime is not None:
        await runtime.stop()
