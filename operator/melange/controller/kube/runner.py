"""Start Kopf with the operator's handlers: how `melange run` reaches Kopf without importing it.

Importing this module registers the handlers (`handlers` declares them with Kopf's decorators).
"""

from __future__ import annotations

from collections.abc import Collection

import kopf

from melange.controller.kube import handlers  # noqa: F401  (importing registers them)
from melange.controller.kube.client import kubeconfig_namespace
from melange.controller.settings import RunSettings


def default_lease_namespace(kubeconfig: str | None, pod_namespace: str | None) -> str:
    """The pod's namespace in a cluster, else the kubeconfig context's, else `default`."""
    return pod_namespace or kubeconfig_namespace(kubeconfig) or "default"


def run_operator(
    *,
    namespaces: Collection[str],
    liveness_endpoint: str | None,
    verbose: bool,
    settings: RunSettings,
) -> None:
    """Run the operator until SIGINT/SIGTERM, logging in plain text (more with `verbose`).

    Kopf runs standalone: the controller's own Lease decides which replica writes, and every
    replica keeps its watch of allocations warm for a fast takeover.
    """
    kopf.configure(verbose=verbose, log_format=kopf.LogFormat.PLAIN)
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=True,
        liveness_endpoint=liveness_endpoint,
        memo=kopf.Memo(run=settings),
    )
