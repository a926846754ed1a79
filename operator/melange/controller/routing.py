"""What the operator publishes for a request router, decided without I/O.

Every solved plan gets its routing table (`melange.plan.routing.derive`): the shares by input
length go into the status (`status.inputRouting`, the table's `byInput`), and with
`spec.routing.publishConfigMap` the whole table, naming each type's upstream Service, is written
to the ConfigMap `<allocation>-routing` (key `table.json`) that a router watches. The ConfigMap is
owned by the allocation (an ownerReference: garbage-collected with it) and only a ConfigMap so
owned is ever changed, so an allocation cannot be used to overwrite another object.
"""

from __future__ import annotations

import json
from typing import Any

from melange.api import AllocationSpec
from melange.api.conditions import ROUTING_PUBLISHED, Condition
from melange.plan import routing
from melange.plan.problem import Problem
from melange.plan.result import Plan

CONFIG_MAP_SUFFIX = "-routing"
TABLE_KEY = "table.json"
MAX_NAME = 253  # a ConfigMap's name is a DNS subdomain
ALLOCATION_LABEL = "melange.dev/allocation"


def table_for(
    spec: AllocationSpec, rate: float | None, plan: Plan, namespace: str
) -> routing.RouteTable:
    """The routing table of `plan`, solved for `spec` at `rate`, naming each type's upstream
    Service in the allocation's `namespace`."""
    table = routing.derive(Problem.from_spec(spec, rate=rate), plan)
    upstreams = {
        gpu.name: routing.Upstream(
            service=gpu.upstream.service, port=gpu.upstream.port, namespace=namespace
        )
        for gpu in spec.gpus
        if gpu.upstream is not None
    }
    return routing.with_upstreams(table, upstreams)


def input_routing_status(table: routing.RouteTable | None) -> dict[str, Any]:
    """`status.inputRouting` (per input bucket, the types with a share) and its load error;
    None deletes both (a plan without a table)."""
    if table is None:
        return {"inputRouting": None, "inputRoutingError": None}
    edges = table.input_edges
    return {
        "inputRouting": [
            {
                "inputTokens": [edges[i], edges[i + 1]],
                "shares": [
                    {"gpu": gpu, "fraction": round(share, 6)}
                    for gpu, share in zip(table.gpus, shares, strict=True)
                    if share > 0
                ],
            }
            for i, shares in enumerate(table.by_input)
        ],
        "inputRoutingError": round(table.input_load_error, 6),
    }


def config_map_name(allocation: str) -> str | None:
    """`<allocation>-routing`; None when that is longer than a ConfigMap's name may be."""
    name = allocation + CONFIG_MAP_SUFFIX
    return name if len(name) <= MAX_NAME else None


def document(table: routing.RouteTable) -> str:
    """The table's JSON as the ConfigMap holds it, keys in a stable order (an unchanged plan
    writes the same bytes, so nothing is rewritten)."""
    return json.dumps(routing.to_dict(table), sort_keys=True, separators=(",", ":"))


def published(name: str) -> Condition:
    return Condition(
        ROUTING_PUBLISHED,
        "True",
        "Published",
        f"the routing table of the current plan is in ConfigMap {name}, key {TABLE_KEY}",
    )


def unpublished(reason: str, message: str) -> Condition:
    """The ConfigMap is not current; the router keeps what it last read."""
    return Condition(ROUTING_PUBLISHED, "False", reason, message)


def name_too_long(allocation: str) -> Condition:
    return unpublished(
        "NameTooLong",
        f"the ConfigMap name {allocation}{CONFIG_MAP_SUFFIX} would be longer than {MAX_NAME} "
        "characters; give the allocation a shorter name",
    )
