"""`melange status NAME`: what the operator decided for one allocation, and why, for a person.

The reading is `melange.controller.kube.inspect` (the only Kubernetes I/O, imported when the
command runs); everything here is pure: `status_report` turns the stored object and its Events
into one document (`-o json|yaml` prints it as is), `render_table` turns that document into text.
Both take plain dicts and tolerate any status, so an odd or old one never ends in a traceback.

Exit codes: 0 shown (whatever the allocation's state: `kubectl wait` is the tool to wait for
Ready), 1 no such allocation, 2 a bad NAME or namespace, no credentials, or a server that cannot
be reached, refuses the credentials or the read, or does not serve the CRD.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import click

from melange.cli.util import EXIT_INVALID, dump, fail, table_format

EXIT_NOT_FOUND = 1
MAX_EVENTS = 10  # the newest ones shown; `kubectl events` lists them all
# metadata.name of a custom resource: a DNS subdomain; a namespace: a DNS label
NAME_PATTERN = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
NAMESPACE_PATTERN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@click.command("status")
@click.argument("name")
@click.option(
    "-n",
    "--namespace",
    help="The allocation's namespace; default: the kubeconfig context's, else default.",
)
@click.option(
    "--kubeconfig",
    type=click.Path(dir_okay=False),
    help="Kubeconfig file; default: in-cluster credentials, else $KUBECONFIG or ~/.kube/config.",
)
@table_format("table: for a person; json and yaml: the same as one document of a stable shape.")
def status_command(name: str, namespace: str | None, kubeconfig: str | None, output: str) -> None:
    """Show what the operator decided for the MelangeAllocation NAME, and why.

    Reads the allocation and its Events: whether it is Ready, the plan (cost, lower bound, rates,
    saving, prices), each node pool's planned, asked, observed and ready counts, the last patches
    with their reasons, every condition and the newest Events. Exits 0 when it is shown (whatever
    its state), 1 when there is no such allocation, 2 on a bad NAME or namespace, missing
    credentials, or an API server that cannot be reached, refuses, or lacks the CRD.
    """
    problems = []
    if len(name) > 253 or not NAME_PATTERN.fullmatch(name):
        problems.append(f"NAME {name!r}: not a valid object name (lower-case DNS subdomain)")
    if namespace is not None and (
        len(namespace) > 63 or not NAMESPACE_PATTERN.fullmatch(namespace)
    ):
        problems.append(f"--namespace {namespace!r}: not a valid namespace (lower-case DNS label)")
    if problems:
        fail(problems, EXIT_INVALID)
    from melange.controller.kube import inspect

    if namespace is None:
        namespace = inspect.default_namespace(kubeconfig)
    try:
        reading = inspect.read_allocation(name, namespace, kubeconfig)
    except inspect.AllocationNotFound as exc:
        fail([str(exc)], EXIT_NOT_FOUND)
    except inspect.InspectError as exc:
        fail([str(exc)], EXIT_INVALID)
    if reading.events_error:
        click.echo(f"warning: {reading.events_error}", err=True)
    report = status_report(reading.allocation, reading.events)
    if output == "table":
        click.echo(render_table(report, datetime.now(UTC)), nl=False)
    else:
        click.echo(dump(report, output), nl=False)


# -- the document -----------------------------------------------------------------------------


def status_report(
    allocation: Mapping[str, Any],
    events: Sequence[Mapping[str, Any]] | None,
    max_events: int = MAX_EVENTS,
) -> dict[str, Any]:
    """The allocation as `-o json|yaml` prints it: every key always there (null when unknown),
    lists oldest first. `events` None: they could not be listed (null in the document)."""
    metadata = _mapping(allocation.get("metadata"))
    spec = _mapping(allocation.get("spec"))
    status = _mapping(allocation.get("status"))
    generation = _int(metadata.get("generation"))
    observed = _int(status.get("observedGeneration"))
    conditions = [_condition(c) for c in _mappings(status.get("conditions"))]
    ready = next((c for c in conditions if c["type"] == "Ready"), None)
    return {
        "name": _str(metadata.get("name")),
        "namespace": _str(metadata.get("namespace")),
        "creationTimestamp": _str(metadata.get("creationTimestamp")),
        "generation": generation,
        "observedGeneration": observed,
        "stale": generation is not None and (observed is None or observed < generation),
        "ready": ready,
        "plan": _plan(status),
        "pools": _pools(spec, status),
        "transitionSince": _str(status.get("transitionSince")),
        "recentPatches": _patches(status),
        "conditions": conditions,
        "events": None if events is None else _events(events, max_events),
    }


def _plan(status: Mapping[str, Any]) -> dict[str, Any]:
    cost, bound = _number(status.get("costPerHour")), _number(status.get("lowerBound"))
    gap = None
    if cost is not None and bound is not None:
        gap = 0.0 if cost <= 0 else round(max(0.0, (cost - bound) / cost), 6)
    best_raw = status.get("singleTypeBaseline")
    best = None
    if isinstance(best_raw, Mapping):
        best = {
            "name": _str(best_raw.get("name")),
            "replicas": _int(best_raw.get("replicas")),
            "costPerHour": _number(best_raw.get("costPerHour")),
        }
    saving = _number(status.get("savingPerHour"))
    return {
        "status": _str(status.get("planStatus")),
        "costPerHour": cost,
        "lowerBound": bound,
        "gap": gap,
        "totalReplicas": _int(status.get("totalReplicas")),
        "gpuTypes": _int(status.get("gpuTypes")),
        "solvedRate": _number(status.get("solvedRate")),
        "observedRate": _number(status.get("observedRate")),
        "lastObservationTime": _str(status.get("lastObservationTime")),
        "lastSolveTime": _str(status.get("lastSolveTime")),
        "solveSeconds": _number(status.get("solveSeconds")),
        "savingPerHour": saving,
        "singleTypeBaseline": best,
        "inputRoutingError": _number(status.get("inputRoutingError")),
        "routingConfigMap": _str(status.get("routingConfigMap")),
        "prices": [
            {
                "name": _str(p.get("name")),
                "costPerHour": _number(p.get("costPerHour")),
                "source": _str(p.get("source")),
                "time": _str(p.get("time")),
            }
            for p in _mappings(status.get("prices"))
        ],
    }


def _pools(spec: Mapping[str, Any], status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One entry per GPU type: the spec's order, then any the status alone still names."""
    targets = _by_name(status.get("targets"))
    planned = _by_name(status.get("gpus"))
    caps = _by_name(status.get("gpuCaps"))
    refs = {}
    for gpu in _mappings(spec.get("gpus")):
        ref = _mapping(gpu.get("scaleTargetRef"))
        if isinstance(gpu.get("name"), str):
            kind, name = _str(ref.get("kind")), _str(ref.get("name"))
            refs[gpu["name"]] = f"{kind}/{name}" if kind and name else None
    pools = []
    for gpu in dict.fromkeys([*refs, *targets, *planned]):
        target, plan, cap = targets.get(gpu, {}), planned.get(gpu, {}), caps.get(gpu)
        count = _int(target.get("plannedReplicas"))
        pools.append(
            {
                "name": gpu,
                "target": _str(target.get("target")) or refs.get(gpu),
                "policy": _str(target.get("policy")),
                "planned": count if count is not None else _int(plan.get("replicas")),
                "asked": _int(target.get("desiredReplicas")),
                "observed": _int(target.get("observedReplicas")),
                "ready": _int(target.get("readyReplicas")),
                "costPerHour": _number(plan.get("costPerHour")),
                "utilization": _number(plan.get("utilization")),
                "shortSince": _str(target.get("shortSince")),
                "lastScaleTime": _str(target.get("lastScaleTime")),
                "cap": None
                if cap is None
                else {
                    "replicas": _int(cap.get("replicas")),
                    "since": _str(cap.get("since")),
                    "retryTime": _str(cap.get("retryTime")),
                },
            }
        )
    return pools


def _patches(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`status.recentPatches`, oldest first. It is stored newest first, but the patches of one
    reconcile (one time) in the order they were made, which is kept."""
    stored = _mappings(status.get("recentPatches"))
    groups = [list(group) for _, group in itertools.groupby(stored, key=lambda p: p.get("time"))]
    return [
        {
            "time": _str(p.get("time")),
            "name": _str(p.get("name")),
            "target": _str(p.get("target")),
            "from": _int(p.get("from")),
            "to": _int(p.get("to")),
            "reason": _str(p.get("reason")),
        }
        for group in reversed(groups)
        for p in group
    ]


def _condition(condition: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": _str(condition.get("type")),
        "status": _str(condition.get("status")),
        "reason": _str(condition.get("reason")),
        "message": _str(condition.get("message")),
        "lastTransitionTime": _str(condition.get("lastTransitionTime")),
        "observedGeneration": _int(condition.get("observedGeneration")),
    }


def _events(events: Sequence[Mapping[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The newest `limit` Events, oldest first (as `kubectl describe` lists them)."""
    entries = []
    for event in events:
        if not isinstance(event, Mapping):
            continue
        metadata = _mapping(event.get("metadata"))
        series = _mapping(event.get("series"))
        last = (
            _str(series.get("lastObservedTime"))
            or _str(event.get("lastTimestamp"))
            or _str(event.get("eventTime"))
            or _str(metadata.get("creationTimestamp"))
        )
        first = _str(event.get("firstTimestamp")) or _str(event.get("eventTime")) or last
        count = _int(series.get("count")) or _int(event.get("count")) or 1
        version = _str(metadata.get("resourceVersion")) or ""
        order = (_time(last) or datetime.min.replace(tzinfo=UTC), _version(version))
        entries.append(
            (
                order,
                {
                    "type": _str(event.get("type")),
                    "reason": _str(event.get("reason")),
                    "message": _str(event.get("message")),
                    "count": count,
                    "firstTimestamp": first,
                    "lastTimestamp": last,
                },
            )
        )
    entries.sort(key=lambda entry: entry[0])
    return [entry for _, entry in entries[-limit:]] if limit > 0 else []


def _version(value: str) -> int:
    """A resourceVersion as a tie-break between Events of the same second (0 if not a number)."""
    return int(value) if value.isdigit() else 0


# -- the table --------------------------------------------------------------------------------


def render_table(report: Mapping[str, Any], now: datetime) -> str:
    """`status_report`'s document for a person; ages are counted from `now`."""
    lines: list[str] = []
    namespace = report.get("namespace") or "?"
    field = _fields(lines)
    field("Name", report.get("name") or "?")
    field("Namespace", namespace)
    if report.get("creationTimestamp"):
        field("Created", _when(report["creationTimestamp"], now))
    ready = report.get("ready")
    if ready is None:
        field("Ready", "Unknown (no Ready condition yet)")
    else:
        since = _age(ready.get("lastTransitionTime"), now)
        text = f"{ready.get('status') or '?'}, {ready.get('reason') or 'no reason'}"
        if ready.get("message"):
            text += f": {_line(ready['message'])}"
        field("Ready", text + (f" (for {since})" if since != "-" else ""))
    field("Generation", _generation(report, namespace))

    plan = _mapping(report.get("plan"))
    lines += ["", "Plan:"]
    if not plan.get("status"):
        solved = next(
            (c for c in _mappings(report.get("conditions")) if c.get("type") == "Solved"), None
        )
        if solved is not None and solved.get("status") != "True":
            lines.append(
                f"  none: {solved.get('reason') or 'not solved'} (the Solved condition says why)"
            )
        else:
            lines.append("  none yet: the operator has not solved this allocation")
    else:
        _plan_lines(plan, now, lines)

    pools = list(_mappings(report.get("pools")))
    _section(
        lines,
        "Pools",
        ["GPU", "TARGET", "POLICY", "PLANNED", "ASKED", "OBSERVED", "READY", "LAST SCALE"],
        [
            [
                p.get("name") or "?",
                p.get("target") or "-",
                p.get("policy") or "-",
                _count(p.get("planned")),
                _count(p.get("asked")),
                _count(p.get("observed")),
                _count(p.get("ready")),
                _age(p.get("lastScaleTime"), now, ago=True),
            ]
            for p in pools
        ],
        right={3, 4, 5, 6},
    )
    for pool in pools:
        if pool.get("shortSince"):
            lines.append(
                f"  {pool.get('name')}: short of its asked count since "
                f"{_when(pool['shortSince'], now)}"
            )
    capped = [p for p in pools if isinstance(p.get("cap"), Mapping)]
    if capped:
        lines.append("  Capacity caps:")
        for pool in capped:
            cap = pool["cap"]
            text = f"    {pool.get('name')}: at most {_count(cap.get('replicas'))}"
            if cap.get("since"):
                text += f" since {_when(cap['since'], now)}"
            if cap.get("retryTime"):
                text += f"; asked for its full count again {_at(cap['retryTime'], now)}"
            lines.append(text)
    if report.get("transitionSince"):
        lines.append(f"  Transition under way since {_when(report['transitionSince'], now)}")

    _section(
        lines,
        "Last decisions (newest last)",
        ["WHEN", "GPU", "TARGET", "REPLICAS", "REASON"],
        [
            [
                _age(p.get("time"), now, ago=True),
                p.get("name") or "?",
                p.get("target") or "-",
                f"{_count(p.get('from'))} -> {_count(p.get('to'))}",
                p.get("reason") or "-",
            ]
            for p in _mappings(report.get("recentPatches"))
        ],
    )
    _section(
        lines,
        "Conditions",
        ["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"],
        [
            [
                c.get("type") or "?",
                c.get("status") or "?",
                c.get("reason") or "-",
                _age(c.get("lastTransitionTime"), now),
                _line(c.get("message") or ""),
            ]
            for c in _mappings(report.get("conditions"))
        ],
        empty="none yet",
    )
    events = report.get("events")
    _section(
        lines,
        "Events (newest last)",
        ["TYPE", "REASON", "AGE", "MESSAGE"],
        [
            [
                e.get("type") or "-",
                e.get("reason") or "-",
                _event_age(e, now),
                _line(e.get("message") or ""),
            ]
            for e in _mappings(events)
        ],
        empty="none" if events is not None else "cannot be listed",
    )
    return "\n".join(lines) + "\n"


def _generation(report: Mapping[str, Any], namespace: str) -> str:
    generation, observed = report.get("generation"), report.get("observedGeneration")
    text = f"{_count(generation)}, observed {_count(observed)}"
    if observed is None:
        return (
            f"{_count(generation)}, not observed yet: no status from the operator (is "
            f"`melange run` watching namespace {namespace}?)"
        )
    if report.get("stale"):
        return f"{text}: the status is stale (the latest spec is not reconciled yet)"
    return f"{text} (the status is current)"


def _plan_lines(plan: Mapping[str, Any], now: datetime, lines: list[str]) -> None:
    field = _fields(lines, indent="  ", width=18)
    field("Status", plan["status"])
    if plan.get("costPerHour") is not None:
        field("Cost", f"{_money(plan['costPerHour'])}/h")
    if plan.get("lowerBound") is not None:
        gap = plan.get("gap")
        field(
            "Lower bound",
            f"{_money(plan['lowerBound'])}/h (no plan costs less"
            + (f"; gap {gap:.1%})" if isinstance(gap, int | float) else ")"),
        )
    if plan.get("totalReplicas") is not None:
        types = plan.get("gpuTypes")
        field(
            "Instances",
            f"{plan['totalReplicas']}"
            + (f" of {types} GPU type{'s' if types != 1 else ''}" if types is not None else ""),
        )
    if plan.get("solvedRate") is not None:
        field("Solved rate", f"{_rate(plan['solvedRate'])} req/s")
    if plan.get("observedRate") is not None:
        when = plan.get("lastObservationTime")
        field(
            "Observed rate",
            f"{_rate(plan['observedRate'])} req/s"
            + (f" ({_age(when, now, ago=True)})" if when else ""),
        )
    best = plan.get("singleTypeBaseline")
    saving = plan.get("savingPerHour")
    if isinstance(best, Mapping) or saving is not None:
        text = ""
        if isinstance(best, Mapping):
            text = f"{best.get('name') or '?'} x{_count(best.get('replicas'))}"
            if best.get("costPerHour") is not None:
                text += f" at {_money(best['costPerHour'])}/h"
        if saving is not None:
            text += ("; " if text else "") + f"saving {_money(saving)}/h"
            base = best.get("costPerHour") if isinstance(best, Mapping) else None
            if isinstance(base, int | float) and base > 0:
                text += f" ({saving / base:.1%})"
        field("Best single type", text)
    error, config_map = plan.get("inputRoutingError"), plan.get("routingConfigMap")
    if error is not None or config_map:
        parts = [f"by input length {error:.1%} off the planned loads"] if error is not None else []
        if config_map:
            parts.append(f"table in ConfigMap {config_map}")
        field("Routing", "; ".join(parts))
    if plan.get("lastSolveTime"):
        seconds = plan.get("solveSeconds")
        field(
            "Last solve",
            _when(plan["lastSolveTime"], now)
            + (f", took {seconds:.3f} s" if isinstance(seconds, int | float) else ""),
        )
    prices = list(_mappings(plan.get("prices")))
    if prices:
        lines.append("  Prices:")
        rows = [
            [
                p.get("name") or "?",
                _money(p["costPerHour"]) if p.get("costPerHour") is not None else "-",
                _line(p.get("source") or "-"),
                _age(p.get("time"), now, ago=True),
            ]
            for p in prices
        ]
        lines += _table(["GPU", "COST/H", "SOURCE", "READ"], rows, right={1}, indent="    ")


def _fields(lines: list[str], indent: str = "", width: int = 12) -> Callable[[str, str], None]:
    """A writer of `Label:  value` lines, the values aligned."""

    def field(label: str, value: str) -> None:
        lines.append(f"{indent}{(label + ':').ljust(width)}{value}")

    return field


def _section(
    lines: list[str],
    title: str,
    header: list[str],
    rows: list[list[str]],
    empty: str = "none",
    right: Collection[int] = (),
) -> None:
    """A titled block: the rows as a table, or one line saying there are none."""
    lines += ["", f"{title}:"]
    lines += _table(header, rows, right=right) if rows else [f"  {empty}"]


def _table(
    header: list[str], rows: list[list[str]], right: Collection[int] = (), indent: str = "  "
) -> list[str]:
    """Columns two spaces apart, numbers (`right`) right-aligned, the last column unpadded."""
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [
            c.rjust(w) if k in right else c.ljust(w)
            for k, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return (indent + "  ".join(padded)).rstrip()

    return [line(header), *(line(r) for r in rows)]


# -- values -----------------------------------------------------------------------------------


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _mappings(value: Any) -> list[Mapping[str, Any]]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _by_name(value: Any) -> dict[str, Mapping[str, Any]]:
    return {v["name"]: v for v in _mappings(value) if isinstance(v.get("name"), str)}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _line(text: str) -> str:
    """On one line, printable: a message may hold newlines or a terminal's control sequences."""
    text = " ".join(text.split())
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _count(value: Any) -> str:
    return "-" if value is None else str(value)


def _money(value: float) -> str:
    return f"{value:.2f}" if value == 0 or abs(value) >= 0.01 else f"{value:.2g}"


def _rate(value: float) -> str:
    return f"{value:.4g}"


def human_duration(seconds: float) -> str:
    """As kubectl prints an age: `45s`, `3m12s`, `15m`, `5h20m`, `3d4h`, `400d`, `2y30d`."""
    if seconds < -1:
        return "<invalid>"
    total = max(0, int(seconds))
    if total < 120:
        return f"{total}s"
    minutes = total // 60
    if minutes < 10:
        return f"{minutes}m{total % 60}s" if total % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    days = hours // 24
    if hours < 24 * 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if days < 365 * 2:
        return f"{days}d"
    if days < 365 * 8:
        return f"{days // 365}y{days % 365}d" if days % 365 else f"{days // 365}y"
    return f"{days // 365}y"


def _age(value: Any, now: datetime, ago: bool = False) -> str:
    """How long ago `value` (an RFC 3339 time) was; `-` when there is none."""
    moment = _time(value)
    if moment is None:
        return "-"
    return human_duration((now - moment).total_seconds()) + (" ago" if ago else "")


def _when(value: str, now: datetime) -> str:
    """The time as stored, and how long ago."""
    age = _age(value, now)
    return value if age == "-" else f"{value} ({age} ago)"


def _at(value: str, now: datetime) -> str:
    """A time that may be in the future (a cap's retry): `at T (in 25m)`."""
    moment = _time(value)
    if moment is None:
        return f"at {value}"
    seconds = (moment - now).total_seconds()
    if seconds >= 0:
        return f"at {value} (in {human_duration(seconds)})"
    return f"at {value} ({human_duration(-seconds)} ago)"


def _event_age(event: Mapping[str, Any], now: datetime) -> str:
    """`3m`, or `3m (x4 over 10m)` for an Event seen more than once, as kubectl describe."""
    age = _age(event.get("lastTimestamp"), now)
    count = event.get("count")
    if isinstance(count, int) and count > 1:
        return f"{age} (x{count} over {_age(event.get('firstTimestamp'), now)})"
    return age
