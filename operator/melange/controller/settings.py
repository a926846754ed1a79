"""How `melange run` configures the controller: identity, the Lease, the allow-list."""

from __future__ import annotations

from dataclasses import dataclass, field

from melange.controller.state import Settings


@dataclass(frozen=True)
class RunSettings:
    identity: str
    lease_namespace: str
    lease_name: str = "melange-operator"
    leader_elect: bool = True
    kubeconfig: str | None = None
    controller: Settings = field(default_factory=Settings)
