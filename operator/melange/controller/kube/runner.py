"""Start Kopf with the operator's handlers: how `melange run` reaches Kopf without importing it.

Importing this module registers the handlers (`handlers` declares them with Kopf's decorators).

Start-up: `connect` loads the credentials (a kubeconfig, or the service account in a pod). Outside
a pod it also asks the API server once, with a short timeout, so that a missing kubeconfig, an
unreachable server or rejected credentials end the command with one sentence. In a pod the
operator starts anyway and waits for the API server (`handlers.start`), alive but not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass

import aiohttp.web
import kopf

from melange.controller.kube import handlers  # noqa: F401  (importing registers them)
from melange.controller.kube.client import (
    Credentials,
    CredentialsError,
    check_connection,
    kubeconfig_namespace,
    load_credentials,
)
from melange.controller.settings import RunSettings

__all__ = [
    "CredentialsError",
    "Health",
    "ProbeError",
    "connect",
    "default_lease_namespace",
    "run_operator",
]

log = logging.getLogger("melange.health")

READINESS_PATH = "/readyz"
NOT_READY = "not ready: waiting for the API server, then for every allocation on the watch\n"


class ProbeError(Exception):
    """The probes cannot be served: a bad `--liveness` URL, or its port is taken."""


def default_lease_namespace(kubeconfig: str | None, pod_namespace: str | None) -> str:
    """The pod's namespace in a cluster, else the kubeconfig context's, else `default`."""
    return pod_namespace or kubeconfig_namespace(kubeconfig) or "default"


def connect(kubeconfig: str | None) -> Credentials:
    """The credentials `melange run` uses; outside a pod, checked against the API server.

    Raises CredentialsError (one sentence naming the kubeconfig or the server) when there are no
    usable credentials, or, outside a pod, when the server cannot be reached or refuses them.
    """
    credentials = load_credentials(kubeconfig)
    if not credentials.in_cluster:
        check_connection(credentials)
    return credentials


@dataclass
class Health:
    """What the probes report: alive while the event loop answers; ready once the API server has
    answered and the watch shows every allocation there was (the controller acts from then)."""

    ready: bool = False

    def mark_ready(self) -> None:
        self.ready = True


@contextlib.asynccontextmanager
async def serve_probes(liveness_endpoint: str | None, health: Health) -> AsyncIterator[None]:
    """Liveness at the URL's path and readiness at /readyz, on the URL's address and port."""
    if not liveness_endpoint:
        yield
        return
    parts = urllib.parse.urlsplit(liveness_endpoint)
    if parts.scheme != "http" or not parts.path or parts.path == READINESS_PATH:
        raise ProbeError(
            f"--liveness {liveness_endpoint}: expected http://ADDRESS:PORT/PATH with a path "
            f"other than {READINESS_PATH}"
        )

    async def alive(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.Response(text="ok\n")

    async def ready(_: aiohttp.web.Request) -> aiohttp.web.Response:
        if health.ready:
            return aiohttp.web.Response(text="ok\n")
        return aiohttp.web.Response(status=503, text=NOT_READY)

    app = aiohttp.web.Application()
    app.add_routes([aiohttp.web.get(parts.path, alive), aiohttp.web.get(READINESS_PATH, ready)])
    runner = aiohttp.web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = aiohttp.web.TCPSite(runner, parts.hostname or "localhost", parts.port or 80)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ProbeError(
            f"--liveness {liveness_endpoint}: cannot listen: {exc.strerror or exc}"
        ) from None
    log.debug("liveness at %s, readiness at %s", parts.path, READINESS_PATH)
    try:
        yield
    finally:
        await runner.cleanup()


def run_operator(
    *,
    namespaces: Collection[str],
    liveness_endpoint: str | None,
    verbose: bool,
    settings: RunSettings,
    credentials: Credentials,
    log_formatter: logging.Formatter | None = None,
) -> None:
    """Run the operator until SIGINT/SIGTERM, logging in plain text, or with `log_formatter` (JSON
    lines), more with `verbose`.

    Kopf runs standalone: the controller's own Lease decides which replica writes, and every
    replica keeps its watch of allocations warm for a fast takeover. The probes are served from
    before Kopf starts, so that a replica waiting for the API server is alive but not ready.
    """
    kopf.configure(
        verbose=verbose,
        log_format=kopf.LogFormat.PLAIN if log_formatter is None else kopf.LogFormat.JSON,
        log_refkey="object",
    )
    if log_formatter is not None:
        logging.getLogger().handlers[-1].setFormatter(log_formatter)  # Kopf's, added last
    health = Health()

    async def main() -> None:
        async with serve_probes(liveness_endpoint, health):
            await kopf.operator(
                clusterwide=not namespaces,
                namespaces=namespaces,
                standalone=True,
                memo=kopf.Memo(run=settings, credentials=credentials, health=health),
            )

    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(main())
