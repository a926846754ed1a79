"""Kopf: the watch stream of allocations handed to the controller, and its start and stop.

Only an event handler, no resource-changing handlers, timers or daemons: Kopf writes nothing to allocations (no
finalizer, no progress or last-handled annotations) and deleting one never waits for the
operator. The controller (`melange.controller.loop`) does all reconciling and is the one writer.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from typing import TYPE_CHECKING, Any

import kopf

from melange.controller import metrics
from melange.controller.kube.client import (
    COMPONENT,
    GROUP,
    PLURAL,
    VERSION,
    Credentials,
    CredentialsError,
    KubeClient,
    check_connection,
)
from melange.controller.lease import LeaderElector
from melange.controller.loop import Controller
from melange.controller.settings import RunSettings

if TYPE_CHECKING:
    from melange.controller.kube.runner import Health

log = logging.getLogger("melange.startup")

#: Seconds between attempts to reach the API server at start-up: doubling, then every 30 s.
RETRY_FIRST, RETRY_MAX = 1.0, 30.0


async def wait_for_api_server(credentials: Credentials) -> None:
    """Ask the API server until it answers (in a pod it may not yet be reachable, or the RBAC
    not yet bound): one warning per failed attempt, no traceback, never giving up."""
    delay, attempt = RETRY_FIRST, 0
    while True:
        attempt += 1
        try:
            await asyncio.to_thread(check_connection, credentials)
        except CredentialsError as exc:
            log.warning("attempt %d: %s; next attempt in %.0f s", attempt, exc, delay)
        else:
            if attempt > 1:
                log.info("the API server %s answered (attempt %d)", credentials.server, attempt)
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX)


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    run: RunSettings = memo["run"]
    settings.posting.reporting_component = COMPONENT
    settings.posting.reporting_instance = run.identity
    settings.posting.enabled = False  # Events come from the controller's one path only
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.watching.connect_timeout = 5
    settings.networking.request_timeout = 30
    # The CRD is installed before the operator (the chart's crds/), and namespaces are named, not
    # patterns: no run-time watching of CRDs and namespaces, so no cluster-wide RBAC for them.
    settings.scanning.disabled = True

    # Kopf's watch starts only once this returns: wait here for the API server (outside a pod,
    # `melange run` has already had it answer once). The probes are up meanwhile, not ready.
    credentials: Credentials = memo["credentials"]
    await wait_for_api_server(credentials)
    api_client = credentials.api_client(user_agent=f"{COMPONENT}/{run.identity}")
    elector: LeaderElector | None = None
    kube = KubeClient(api_client, run.identity)
    if run.leader_elect:
        elector = LeaderElector(kube, run.lease_namespace, run.lease_name, run.identity)
        kube.may_write = elector.leading
    controller = Controller(
        kube, kube.may_write if elector is not None else lambda: True, run.controller
    )
    memo["controller"], memo["elector"] = controller, elector
    if elector is not None:
        elector.on_change = controller.leadership_changed
        elector.start()
    else:
        metrics.record_leader(True)
    health: Health | None = memo.get("health")
    if health is not None:
        controller.on_synced = health.mark_ready  # once the watch shows every allocation
    controller.start()


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    """Finish the reconciles in flight, then release the Lease so a standby takes over at once."""
    controller: Controller | None = memo.get("controller")
    if controller is not None:
        await controller.stop()
    elector: LeaderElector | None = memo.get("elector")
    if elector is not None:
        await elector.stop()


@kopf.on.login()
def login(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    """Kopf's connection from the same credentials as the controller's client, read again at each
    (re-)login (a service-account token is rotated). A failure is one error line, then a retry."""
    try:
        credentials: Credentials = memo["credentials"].reload()
    except CredentialsError as exc:
        raise kopf.TemporaryError(str(exc), delay=10) from None
    configuration = credentials.configuration
    scheme, token = credentials.bearer()
    return kopf.ConnectionInfo(
        server=credentials.server,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme,
        token=token,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        proxy_url=configuration.proxy or None,
        trust_env=settings.networking.trust_env,
    )


@kopf.on.event(GROUP, VERSION, PLURAL)
async def allocation_event(
    event: kopf.RawEvent,
    body: kopf.Body,
    namespace: str | None,
    name: str | None,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Every allocation as the watch stream shows it (on the event loop: no thread, no lock)."""
    controller: Controller = memo["controller"]  # set at start-up, before any watching
    if event.get("type") == "DELETED":
        controller.observe((str(namespace), str(name)), None)
        return
    metadata = body.get("metadata", {})
    controller.observe(
        (str(namespace), str(name)),
        {
            "uid": metadata.get("uid"),
            "generation": int(metadata.get("generation") or 0),
            "created": metadata.get("creationTimestamp"),
            "spec": copy.deepcopy(dict(body.get("spec") or {})),
            "status": copy.deepcopy(dict(body.get("status") or {})),
        },
    )
