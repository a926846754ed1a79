"""Reading the API server's audit log: who patched which node pool to what, and what was refused.

The control plane's audit policy records every write with its body (`tests/controlplane/harness.py`),
each request carrying its client's user agent, so a test can list the operator's pool writes, the
competing writer's, and every denied or conflicting attempt, from the API server's own record.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

Event = dict[str, Any]
POOL_RESOURCES = ("deployments", "machinedeployments", "nodepools")


def stamp(event: Event) -> float:
    """When the API server completed the request (seconds since the epoch)."""
    return datetime.fromisoformat(str(event["stageTimestamp"]).replace("Z", "+00:00")).timestamp()


def code(event: Event) -> int:
    return int((event.get("responseStatus") or {}).get("code", 0))


def pool_patches(events: Iterable[Event], namespace: str) -> list[Event]:
    """Every attempt to write a pool's replica count in `namespace` (a /scale patch, or the JSON
    patch of a `replicasPath` kind), whatever its answer, in the order the log has them."""
    found = []
    for event in events:
        ref = event.get("objectRef") or {}
        if event.get("verb") != "patch" or ref.get("namespace") != namespace:
            continue
        if ref.get("resource") not in POOL_RESOURCES:
            continue
        if ref.get("subresource") == "scale" or (
            ref.get("resource") == "nodepools" and not ref.get("subresource")
        ):
            found.append(event)
    return sorted(found, key=stamp)


def succeeded(events: Iterable[Event]) -> list[Event]:
    return [e for e in events if 200 <= code(e) < 300]


def pool(event: Event) -> str:
    """The pool's name, e.g. `pool-l4`."""
    return str(event["objectRef"]["name"])


def written_replicas(event: Event) -> int:
    """The count a pool write set: the JSON Patch's last op, or the /scale body's replicas."""
    body: Any = event["requestObject"]
    if isinstance(body, list):
        return int(body[-1]["value"])
    return int(body["spec"]["replicas"])


def by_agent(events: Iterable[Event], user_agent: str) -> list[Event]:
    return [e for e in events if e.get("userAgent") == user_agent]


def between(events: Iterable[Event], start: float, end: float) -> list[Event]:
    return [e for e in events if start <= stamp(e) < end]


def patched_values(events: Iterable[Event]) -> dict[str, list[int]]:
    """Per pool, the counts it was successfully patched to, in order."""
    values: dict[str, list[int]] = {}
    for event in succeeded(events):
        values.setdefault(pool(event), []).append(written_replicas(event))
    return values
