"""How `melange run` configures the controller: identity, the Lease, the allow-lists, the resync."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from melange.controller.urls import Prefix

RESYNC_SECONDS = 30.0


@dataclass(frozen=True)
class Settings:
    """What the controller loop itself needs."""

    resync_seconds: float = RESYNC_SECONDS
    # "resource.group" of cluster-scoped kinds allocations may resize, e.g. nodepools.karpenter.sh
    allow_cluster_scoped: frozenset[str] = frozenset()
    # URL prefixes rate sources may query (`--allow-prometheus-url`); empty: `controller.urls`'
    # default (any URL, and a bearer token only to an in-cluster Service)
    allow_prometheus_urls: tuple[Prefix, ...] = ()
    # per gpus[].name, the most replicas all allocations together may ask for (`--gpu-budget`)
    gpu_budgets: Mapping[str, int] = field(default_factory=dict)
    # the namespaces watched (`--namespace`); empty: all
    namespaces: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunSettings:
    """Everything `melange run` sets: this replica, its Lease, and the controller's settings."""

    identity: str
    lease_namespace: str
    lease_name: str = "melange-operator"
    leader_elect: bool = True
    kubeconfig: str | None = None
    controller: Settings = field(default_factory=Settings)
