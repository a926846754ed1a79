"""`melange run`: the Kubernetes operator. Kopf and the Kubernetes client are reached through
`melange.controller.kube.runner`, imported when the command runs, so that no other command (nor
this one's help) loads them."""

from __future__ import annotations

import click

from melange.cli.util import fail, require_finite
from melange.cli.version import installed_version


@click.command()
@click.option(
    "-n",
    "--namespace",
    "namespaces",
    multiple=True,
    help="Namespace to watch (repeatable). Without it: all namespaces.",
)
@click.option(
    "--leader-elect/--no-leader-elect",
    default=True,
    show_default=True,
    help="Elect one writer among the replicas with a Kubernetes Lease (the others stand by).",
)
@click.option(
    "--lease-name", default="melange-operator", show_default=True, help="The Lease's name."
)
@click.option(
    "--lease-namespace",
    help="The Lease's namespace; default: $POD_NAMESPACE, else the kubeconfig context's, else "
    "default.",
)
@click.option(
    "--identity",
    help="This replica's name in the Lease, Events and user agent; default: $POD_NAME, else "
    "$HOSTNAME.",
)
@click.option(
    "--allow-cluster-scoped",
    "cluster_scoped",
    metavar="RESOURCE.GROUP",
    multiple=True,
    help="A cluster-scoped kind allocations may resize, e.g. nodepools.karpenter.sh (repeatable). "
    "Without it, a cluster-scoped scale target is refused.",
)
@click.option(
    "--allow-prometheus-url",
    "prometheus_urls",
    metavar="PREFIX",
    multiple=True,
    help="A URL prefix rate sources may query, e.g. https://prometheus.monitoring.svc:9090 "
    "(repeatable): same scheme, host and port, path at or below the prefix's. With it, every other "
    "URL is refused; without it, any URL is queried and a bearer token is sent only to an "
    "in-cluster Service (*.svc, *.svc.cluster.local).",
)
@click.option(
    "--gpu-budget",
    "gpu_budgets",
    metavar="GPU=COUNT",
    multiple=True,
    help="At most COUNT replicas of the GPU type named GPU (gpus[].name) for all allocations "
    "together, e.g. H100=40 (repeatable). Allocations are solved within what the others leave; "
    "one that gets less than its plan would use says so (BudgetLimited).",
)
@click.option(
    "--resync-seconds",
    type=click.FloatRange(1, 3600),
    default=30,
    show_default=True,
    help="How often an allocation without a rate source has its node pools checked (an outside "
    "change is set back); with a rate source, its intervalSeconds.",
)
@click.option(
    "--liveness",
    metavar="URL",
    help="Serve a liveness probe, e.g. http://0.0.0.0:8080/healthz, and a readiness probe at "
    "/readyz on the same address and port.",
)
@click.option(
    "--kubeconfig",
    type=click.Path(dir_okay=False),
    help="Kubeconfig file; default: in-cluster credentials, else $KUBECONFIG or ~/.kube/config.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port of the Prometheus /metrics endpoint (0: do not serve metrics).",
)
@click.option("--metrics-address", default="0.0.0.0", show_default=True, help="Address to bind.")
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text: one message per line; json: one JSON object per line (time, level, logger, "
    "message, exception), Kopf's own messages included.",
)
def run(
    namespaces: tuple[str, ...],
    leader_elect: bool,
    lease_name: str,
    lease_namespace: str | None,
    identity: str | None,
    cluster_scoped: tuple[str, ...],
    prometheus_urls: tuple[str, ...],
    gpu_budgets: tuple[str, ...],
    resync_seconds: float,
    liveness: str | None,
    kubeconfig: str | None,
    metrics_port: int,
    metrics_address: str,
    verbose: bool,
    log_format: str,
) -> None:
    """Run the operator: reconcile MelangeAllocations and scale their node pools.

    Runs until interrupted (SIGINT/SIGTERM). Deleting an allocation leaves its node pools as they
    are; the operator puts no finalizer on allocations. Outside a pod, no credentials or an API
    server that cannot be reached or refuses them at start is one error and exit code 2; in a pod
    it waits for the API server, not ready meanwhile.
    """
    import os

    from melange.cli.logs import JsonFormatter
    from melange.controller import metrics
    from melange.controller.kube.runner import (
        CredentialsError,
        ProbeError,
        connect,
        default_lease_namespace,
        run_operator,
    )
    from melange.controller.settings import RunSettings, Settings
    from melange.controller.urls import parse_prefix

    require_finite({"--resync-seconds": resync_seconds})  # NaN passes FloatRange
    bad = [name for name in cluster_scoped if "." not in name.strip(".")]
    if bad:
        fail(
            [
                f"--allow-cluster-scoped {name}: expected RESOURCE.GROUP, e.g. nodepools.karpenter.sh"
                for name in bad
            ],
            2,
        )
    try:
        prefixes = tuple(parse_prefix(prefix) for prefix in prometheus_urls)
    except ValueError as exc:
        fail([str(exc)], 2)
    budgets, budget_errors = parse_budgets(gpu_budgets)
    if budget_errors:
        fail(budget_errors, 2)
    settings = RunSettings(
        identity=identity or os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or "melange",
        lease_namespace=lease_namespace
        or default_lease_namespace(
            kubeconfig or os.environ.get("KUBECONFIG"), os.environ.get("POD_NAMESPACE")
        ),
        lease_name=lease_name,
        leader_elect=leader_elect,
        kubeconfig=kubeconfig or os.environ.get("KUBECONFIG"),
        controller=Settings(
            resync_seconds=resync_seconds,
            allow_cluster_scoped=frozenset(cluster_scoped),
            allow_prometheus_urls=prefixes,
            gpu_budgets=budgets,
            namespaces=tuple(namespaces),
        ),
    )

    try:
        credentials = connect(kubeconfig)
    except CredentialsError as exc:
        fail([str(exc)], 2)

    if metrics_port:
        metrics.record_build_info(installed_version())
        try:
            metrics.serve(metrics_port, metrics_address)
        except OSError as exc:
            fail([f"--metrics-port {metrics_port}: cannot listen: {exc.strerror or exc}"], 2)

    try:
        run_operator(
            namespaces=namespaces,
            liveness_endpoint=liveness,
            verbose=verbose,
            settings=settings,
            credentials=credentials,
            log_formatter=JsonFormatter() if log_format == "json" else None,
        )
    except ProbeError as exc:
        fail([str(exc)], 2)


def parse_budgets(values: tuple[str, ...]) -> tuple[dict[str, int], list[str]]:
    """`--gpu-budget GPU=COUNT` values as a mapping, and one error line per bad value."""
    import re

    budgets: dict[str, int] = {}
    errors = []
    for value in values:
        name, _, count = value.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", name) or not (
            count.isdigit() and int(count) <= 1_000_000
        ):
            errors.append(
                f"--gpu-budget {value}: expected GPU=COUNT, a gpus[].name and a whole number "
                "of replicas, e.g. H100=40"
            )
        elif name in budgets:
            errors.append(f"--gpu-budget {value}: {name} has a budget already")
        else:
            budgets[name] = int(count)
    return budgets, errors
