"""Kopf: the watch stream of allocations handed to the controller, and its start and stop.

Only an event handler, no resource-changing handlers, timers or daemons: Kopf writes nothing to allocations (no
finalizer, no progress or last-handled annotations) and deleting one never waits for the
operator. The controller (`melange.controller.loop`) does all reconciling and is the one writer.
"""

from __future__ import annotations

import copy
from typing import Any

import kopf

from melange.controller import metrics
from melange.controller.kube.client import (
    COMPONENT,
    GROUP,
    PLURAL,
    VERSION,
    KubeClient,
    new_api_client,
)
from melange.controller.lease import LeaderElector
from melange.controller.loop import Controller
from melange.controller.settings import RunSettings


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

    api_client = new_api_client(run.kubeconfig, user_agent=f"{COMPONENT}/{run.identity}")
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
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster service account first, else the kubeconfig; Kopf's own readers."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


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
