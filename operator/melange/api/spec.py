"""Typed model of the `MelangeAllocation` spec, and its validation.

The CRD (crds/melangeallocations.melange.dev.yaml) states the same rules for the API server: every
bound, pattern and CEL rule there is enforced here too, so `melange solve` accepts exactly what
`kubectl apply` would (tests/e2e/test_spec_parity.py proves it against a real API server).

Pydantic checks each field on its own (types, bounds, lengths, patterns, unknown keys); the
cross-field rules (matrix shapes against the bucket edges, unique names and targets, min <= max, the
rate source's choices) run over the raw document as well, so one pass reports every error at once,
each naming its field path and the offending value. Values are read as the API server reads JSON:
a null field is an absent one, numbers and booleans are never parsed from strings, and an integral
number such as 8.0 is an integer.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, ValidationError
from pydantic_core import PydanticCustomError

API_GROUP = "melange.dev"
API_VERSION = "v1alpha1"
KIND = "MelangeAllocation"
MAX_SLICE_FACTOR = 1024
MAX_EDGES = 33  # so at most 32 buckets per axis, a 32 x 32 matrix
MAX_EDGE = 10_000_000  # tokens
MAX_BUCKETS = MAX_EDGES - 1
MAX_GPUS = 16
MAX_REPLICAS = 10_000
MAX_COST_PER_HOUR = 1_000_000_000  # any currency
# Bounds on the workload's numbers, so that no sum or product the solver forms can overflow: a
# bucket's load is at most MAX_RATE * (1 + headroom) req/s over a throughput, 1,024 buckets of 1,024
# slices sum far below the float maximum, and a distribution's cells sum to at most 1024 * 1e12.
MAX_RATE = 1_000_000_000  # req/s: workload.totalRate and each gpus[].throughput cell
MIN_POSITIVE_RATE = 1e-6  # req/s: a positive totalRate is at least this (one request in 11.6 days)
MAX_CELL = 1_000_000_000_000  # workload.distribution cells (relative rates, any scale)
MAX_MIN_REQUESTS = 1_000_000_000_000  # workload.fromPrometheus.minRequests
GPU_NAME_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
REPLICAS_PATH_PATTERN = r"^(/[^/]+)+$"
# http(s), a host, an optional path: no user info, query or fragment (nor a backslash or a space),
# so nothing in the URL can move the query endpoint the operator appends to its path.
URL_PATTERN = r"^https?://[^/?#@\\\s]+(/[^?#\\\s]*)?$"
POLICIES = ("Enforce", "Observe")
SERVICE_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"  # a Service name (an RFC 1035 label)
PORT_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # a Service port's name (IANA_SVC_NAME)


def _integral(value: Any) -> Any:
    """JSON has one number type: an integral float (8.0) is the integer the API server takes it for."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _service_port(value: Any) -> int | str:
    """A Service port as a Service's targetPort is written: a number or a name (IntOrString)."""
    value = _integral(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    if (
        isinstance(value, str)
        and len(value) <= 15
        and re.fullmatch(PORT_NAME_PATTERN, value)
        and re.search("[a-z]", value)  # "8080" is a number written as a string, not a name
    ):
        return value
    raise PydanticCustomError(
        "service_port",
        "must be a port number (1..65535) or a port name (lower case letters, digits and '-', "
        "with a letter, at most 15 characters)",
    )


Integer = Annotated[int, BeforeValidator(_integral)]
Number = Annotated[float, Field(allow_inf_nan=False)]
Edge = Annotated[Integer, Field(ge=1, le=MAX_EDGE)]
Cell = Annotated[float, Field(ge=0, le=MAX_CELL, allow_inf_nan=False)]
Throughput = Annotated[float, Field(ge=0, le=MAX_RATE, allow_inf_nan=False)]
Matrix = Annotated[
    list[Annotated[list[Cell], Field(min_length=1, max_length=MAX_BUCKETS)]],
    Field(min_length=1, max_length=MAX_BUCKETS),
]
ThroughputMatrix = Annotated[
    list[Annotated[list[Throughput], Field(min_length=1, max_length=MAX_BUCKETS)]],
    Field(min_length=1, max_length=MAX_BUCKETS),
]
Name = Annotated[str, Field(min_length=1, max_length=253)]
Policy = Literal["Enforce", "Observe"]


class _Model(BaseModel):
    """Base: camelCase names as in the manifest, unknown keys rejected (typos never pass silently),
    and JSON's types taken strictly ("3" is not a number, "true" not a boolean), as the API server does."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, strict=True)


class Buckets(_Model):
    input_tokens: list[Edge] = Field(alias="inputTokens", min_length=2, max_length=MAX_EDGES)
    output_tokens: list[Edge] = Field(alias="outputTokens", min_length=2, max_length=MAX_EDGES)


class DistributionSource(_Model):
    """Follow the live request-size distribution: vLLM's prompt and generation token histograms.

    Their increase over `windowSeconds` gives the matrix's row and column sums; the joint matrix is
    fitted to them from `workload.distribution` (iterative proportional fitting). Read from
    `rateSource.prometheus` (its URL and credentials), for `modelName` (default: the rate source's).
    """

    window_seconds: Integer = Field(default=3600, alias="windowSeconds", ge=10, le=7 * 86400)
    drift_tolerance: Number = Field(default=0.1, alias="driftTolerance", gt=0, le=1)
    min_requests: Number = Field(default=100, alias="minRequests", ge=0, le=MAX_MIN_REQUESTS)
    model_name: Name | None = Field(default=None, alias="modelName")


class Workload(_Model):
    distribution: Matrix
    # 0, or MIN_POSITIVE_RATE..MAX_RATE (the lower end is a cross-field rule: it names 0 too)
    total_rate: Number = Field(alias="totalRate", ge=0, le=MAX_RATE)
    from_prometheus: DistributionSource | None = Field(default=None, alias="fromPrometheus")


class ObjectReference(_Model):
    """A scalable object in the allocation's namespace (as HPA's CrossVersionObjectReference)."""

    api_version: str = Field(alias="apiVersion", min_length=1, max_length=253)
    kind: str = Field(min_length=1, max_length=63)
    name: Name

    @property
    def group(self) -> str:
        """The API group: what comes before "/" in apiVersion, "" for the core group ("v1")."""
        return _group(self.api_version)


class SecretKeyRef(_Model):
    name: Name
    key: Name


class PriceSource(_Model):
    """Where a GPU type's live price per hour comes from: a ConfigMap key (in the allocation's
    namespace, labelled melange.dev/price-source=true by its owner) or a PromQL query run against
    rateSource.prometheus (e.g. a spot-price exporter's series). Exactly one."""

    config_map_key_ref: SecretKeyRef | None = Field(default=None, alias="configMapKeyRef")
    prometheus_query: str | None = Field(
        default=None, alias="prometheusQuery", min_length=1, max_length=4096
    )


class Upstream(_Model):
    """The model servers of a GPU type, for a router: a Service in the allocation's namespace
    (its EndpointSlices list the servers) and one of its ports, by number or name."""

    service: str = Field(min_length=1, max_length=63, pattern=SERVICE_NAME_PATTERN)
    port: Annotated[int | str, PlainValidator(_service_port)]


class Routing(_Model):
    """What the operator publishes for a router, besides status.inputRouting."""

    # Write the routing table to the ConfigMap <allocation>-routing (key table.json), owned by
    # the allocation; a ConfigMap of that name the allocation does not own is never changed.
    publish_config_map: bool = Field(default=False, alias="publishConfigMap")


class GpuType(_Model):
    name: str = Field(min_length=1, max_length=63, pattern=GPU_NAME_PATTERN)
    # bounded so that a plan's cost (at most 16 x 10,000 instances) is a finite number
    cost_per_hour: Number = Field(alias="costPerHour", gt=0, le=MAX_COST_PER_HOUR)
    throughput: ThroughputMatrix
    min_replicas: Integer = Field(default=0, alias="minReplicas", ge=0, le=MAX_REPLICAS)
    max_replicas: Integer | None = Field(default=None, alias="maxReplicas", ge=0, le=MAX_REPLICAS)
    scale_target_ref: ObjectReference | None = Field(default=None, alias="scaleTargetRef")
    replicas_path: str | None = Field(
        default=None, alias="replicasPath", max_length=256, pattern=REPLICAS_PATH_PATTERN
    )
    # Enforce: a replica count changed by someone else is set back to the plan within one interval,
    # with an Event. Observe: plan changes are still applied, an outside change is only reported.
    policy: Policy = "Enforce"
    # Where the target shows how many of its replicas are ready (make-before-break reads it only
    # when spec.transition is set); a target without the field counts as ready at once.
    ready_replicas_path: str = Field(
        default="/status/readyReplicas",
        alias="readyReplicasPath",
        max_length=256,
        pattern=REPLICAS_PATH_PATTERN,
    )
    # At most this many replicas more (fewer) per interval, as HPA's behavior policies; None: any.
    max_scale_up_per_interval: Integer | None = Field(
        default=None, alias="maxScaleUpPerInterval", ge=1, le=MAX_REPLICAS
    )
    max_scale_down_per_interval: Integer | None = Field(
        default=None, alias="maxScaleDownPerInterval", ge=1, le=MAX_REPLICAS
    )
    # Among plans of the same cost, the one using more of the higher-priority types (as
    # Karpenter's NodePool weight: higher is preferred); unset counts as 0.
    priority: Integer | None = Field(default=None, ge=0, le=1000)
    # costPerHour is the price until the source is first read, and whenever it never was
    cost_per_hour_from: PriceSource | None = Field(default=None, alias="costPerHourFrom")
    upstream: Upstream | None = None


class PrometheusSource(_Model):
    url: str = Field(max_length=2048, pattern=URL_PATTERN)
    query: str | None = Field(default=None, min_length=1, max_length=4096)
    # Without `query`: vLLM's request rate for the series labelled model_name=<modelName>,
    # rate() over `rangeSeconds` (default 120).
    model_name: Name | None = Field(default=None, alias="modelName")
    range_seconds: Integer | None = Field(default=None, alias="rangeSeconds", ge=1, le=86400)
    bearer_token_secret_ref: SecretKeyRef | None = Field(default=None, alias="bearerTokenSecretRef")
    ca_config_map_ref: SecretKeyRef | None = Field(default=None, alias="caConfigMapRef")
    # Scale from zero: while this reads above 0 (e.g. a gateway's pending requests) and the
    # observed rate plans no replica at all, the plan is solved for workload.totalRate.
    activation_query: str | None = Field(
        default=None, alias="activationQuery", min_length=1, max_length=4096
    )


class RateSource(_Model):
    prometheus: PrometheusSource
    interval_seconds: Integer = Field(default=30, alias="intervalSeconds", ge=5, le=3600)
    drift_tolerance: Number = Field(default=0.1, alias="driftTolerance", ge=0, le=10)
    scale_down_stabilization_seconds: Integer = Field(
        default=300, alias="scaleDownStabilizationSeconds", ge=0, le=86400
    )


class Transition(_Model):
    """Make-before-break: new capacity first, old capacity removed once the new is ready.

    Without it (the default) every pool is set to the plan at once.
    """

    # Scale-downs wait at most this long for the scale-ups of the same change to become ready.
    ready_timeout_seconds: Integer = Field(default=600, alias="readyTimeoutSeconds", ge=0, le=86400)
    # A type short of its count for this long is capped at what is ready, and the plan re-solved
    # without the missing capacity; None: never capped.
    capacity_timeout_seconds: Integer | None = Field(
        default=None, alias="capacityTimeoutSeconds", ge=1, le=86400
    )
    # How long a cap holds before the type is asked for its full count again.
    capacity_retry_seconds: Integer = Field(
        default=1800, alias="capacityRetrySeconds", ge=1, le=7 * 86400
    )


class AllocationSpec(_Model):
    buckets: Buckets
    workload: Workload
    gpus: list[GpuType] = Field(min_length=1, max_length=MAX_GPUS)
    slice_factor: Integer = Field(default=8, alias="sliceFactor", ge=1, le=MAX_SLICE_FACTOR)
    headroom: Number = Field(default=0.0, ge=0, le=10)
    rate_source: RateSource | None = Field(default=None, alias="rateSource")
    dry_run: bool = Field(default=False, alias="dryRun")
    transition: Transition | None = None
    # Keep the current mix unless the new plan saves more than this fraction of its cost per hour;
    # None: always take the cheapest plan.
    min_savings: Number | None = Field(default=None, alias="minSavings", ge=0, le=1)
    # A price read from a gpus[].costPerHourFrom source re-solves when it moved by more than this
    # fraction from the price the plan was solved with.
    price_tolerance: Number = Field(default=0.05, alias="priceTolerance", ge=0, le=10)
    routing: Routing | None = None


@dataclass(frozen=True)
class FieldError:
    """One validation failure: where (a field path such as `spec.gpus[1].name`) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class SpecError(ValueError):
    """The document is not a valid allocation; `errors` lists every problem found."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


@dataclass(frozen=True)
class Allocation:
    """A parsed document: the spec, and the metadata when it came as a full custom resource."""

    spec: AllocationSpec
    name: str | None = None
    namespace: str | None = None


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _join(prefix: str, loc: Sequence[str | int]) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _PLAIN_KEY.match(part):  # an odd key, such as "" or "a.b", quoted
            path += f"[{json.dumps(part)}]"
        else:
            path += f".{part}" if path else part
    return path


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if len(value) <= 80 else f"{value[:60]!r}... ({len(value)} characters)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if (
        isinstance(value, float)
        and value.is_integer()
        and math.isfinite(value)
        and abs(value) < 1e16
    ):
        return str(int(value))  # 3.0 as 3; 1e308 stays 1e+308, not 309 digits
    if isinstance(value, int) and abs(value) >= 10**20:
        digits = str(abs(value))
        return f"{'-' if value < 0 else ''}{digits[:3]}... (an integer of {len(digits)} digits)"
    if isinstance(value, list | dict | set | frozenset | tuple):
        return f"a {type(value).__name__} of {len(value)}"
    if isinstance(value, bytes | bytearray):  # YAML's !!binary
        return f"binary data of {len(value)} bytes"
    text = str(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _group(api_version: str) -> str:
    return api_version.split("/", 1)[0] if "/" in api_version else ""


_BOUND_MESSAGES = {
    "greater_than_equal": ("ge", ">="),
    "greater_than": ("gt", ">"),
    "less_than_equal": ("le", "<="),
    "less_than": ("lt", "<"),
}


def _pydantic_message(error: Mapping[str, Any]) -> str:
    """Rewrite pydantic's messages into the `must ..., got X` form used across the project."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind in _BOUND_MESSAGES:
        key, op = _BOUND_MESSAGES[kind]
        return f"must be {op} {_show(ctx[key])}, got {_show(value)}"
    if kind == "finite_number":
        return f"must be a finite number, got {_show(value)}"
    if kind == "missing":
        return "is required"
    if kind == "service_port":
        return f"{error['msg']}, got {_show(value)}"
    if kind == "extra_forbidden":
        return "is not a known field"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} items, got {ctx.get('actual_length')}"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} items, got {ctx.get('actual_length')}"
    if kind == "string_too_short":
        return (
            "must not be empty"
            if ctx.get("min_length") == 1
            else f"is too short, got {_show(value)}"
        )
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters, got {len(value or '')}"
    if kind in {"int_type", "int_parsing", "int_from_float"}:
        return f"must be an integer, got {_show(value)}"
    if kind in {"float_type", "float_parsing"}:
        if isinstance(value, int) and not isinstance(value, bool):  # too large for a float
            return f"must be a finite number, got {_show(value)}"
        return f"must be a number, got {_show(value)}"
    if kind == "bool_type":
        return f"must be true or false, got {_show(value)}"
    if kind == "string_type":
        return f"must be a string, got {_show(value)}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {_show(value)}"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')}, got {_show(value)}"
    if kind == "list_type":
        return f"must be a list, got {_show(value)}"
    if kind in {"model_type", "model_attributes_type", "dict_type"}:
        return f"must be a mapping, got {_show(value)}"
    return f"{error['msg'][0].lower()}{error['msg'][1:]}, got {_show(value)}"


def _key(key: Any) -> str:
    """A mapping key as kubectl turns YAML into JSON: a string (`1: x` is the field "1")."""
    if isinstance(key, str):
        return key
    return "null" if key is None else _show(key)


def _without_nulls(raw: Any) -> Any:
    """A null field is an absent one, as for the API server (it prunes them, then defaults)."""
    if isinstance(raw, Mapping):
        return {_key(k): _without_nulls(v) for k, v in raw.items() if v is not None}
    if isinstance(raw, list):
        return [_without_nulls(v) for v in raw]
    return raw


def _parse(raw: Any, prefix: str) -> tuple[AllocationSpec | None, list[FieldError]]:
    try:
        return AllocationSpec.model_validate(raw), []
    except ValidationError as exc:
        return None, [
            FieldError(_join(prefix, e["loc"]), _pydantic_message(e))
            for e in exc.errors(include_url=False)
        ]


def _as_list(value: Any) -> list[Any] | None:
    return value if isinstance(value, list) else None


def _as_int(value: Any) -> int | None:
    value = _integral(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _shape_errors(matrix: Any, rows: int, cols: int, path: str) -> Iterator[FieldError]:
    """One error for a matrix whose shape is not the edges' (rows x columns), saying both shapes."""
    items = _as_list(matrix)
    if items is None:
        return
    widths = [len(row) if isinstance(row, list) else None for row in items]
    wrong = [(i, w) for i, w in enumerate(widths) if w is not None and w != cols]
    if len(items) == rows and not wrong:
        return
    distinct = sorted({w for w in widths if w is not None})
    if not distinct:
        got = f"{len(items)} rows"
    elif len(distinct) == 1 and None not in widths:
        got = f"{len(items)} x {distinct[0]}"
    else:
        of = ", ".join(map(str, distinct[:-1])) + f" or {distinct[-1]}"
        got = f"{len(items)} rows of {of} columns"
        if len(items) == rows:  # the rows that differ, when that is all that is wrong
            listed = ", ".join(f"row {i} has {w}" for i, w in wrong[:3])
            got += f" ({listed}{', ...' if len(wrong) > 3 else ''})"
    yield FieldError(
        path,
        f"must be {rows} x {cols}: {rows} rows (one per input bucket) of {cols} columns (one per "
        f"output bucket), as the bucket edges give; got {got}",
    )


def _edge_errors(edges: Any, path: str) -> tuple[list[FieldError], int | None]:
    """Edges must be strictly increasing (their bounds are the model's); returns the errors and the
    bucket count."""
    items = [_as_int(e) for e in _as_list(edges) or [None]]
    if any(e is None for e in items):
        return [], None
    errors = [
        FieldError(
            f"{path}[{k + 1}]",
            f"must be greater than the previous edge {items[k]}, got {items[k + 1]}",
        )
        for k in range(len(items) - 1)
        if (items[k + 1] or 0) <= (items[k] or 0)
    ]
    return errors, (len(items) - 1 if len(items) >= 2 else None)


def _get(raw: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(raw, Mapping):
            return None
        raw = raw.get(key)
    return raw


def _target(gpu: Any) -> tuple[str, str, str] | None:
    """What a `gpus[]` entry scales, as (group, kind, name); None when its reference is malformed."""
    ref = _get(gpu, "scaleTargetRef")
    parts = [_get(ref, key) for key in ("apiVersion", "kind", "name")]
    if not all(isinstance(part, str) for part in parts):
        return None
    api_version, kind, name = parts
    return _group(api_version), kind, name


def _matrix_errors(raw: Any, p: str) -> list[FieldError]:
    """The matrices' shapes against the bucket edges, and a distribution that can carry a rate."""
    in_errors, rows = _edge_errors(_get(raw, "buckets", "inputTokens"), f"{p}buckets.inputTokens")
    out_errors, cols = _edge_errors(
        _get(raw, "buckets", "outputTokens"), f"{p}buckets.outputTokens"
    )
    errors = in_errors + out_errors
    distribution = _get(raw, "workload", "distribution")
    if rows is not None and cols is not None:
        errors += _shape_errors(distribution, rows, cols, f"{p}workload.distribution")
        for k, gpu in enumerate(_as_list(_get(raw, "gpus")) or []):
            if isinstance(gpu, Mapping):
                errors += _shape_errors(
                    gpu.get("throughput"), rows, cols, f"{p}gpus[{k}].throughput"
                )
    total = _get(raw, "workload", "totalRate")
    if (
        isinstance(total, int | float)
        and not isinstance(total, bool)
        and 0 < total < MIN_POSITIVE_RATE
    ):
        errors.append(
            FieldError(
                f"{p}workload.totalRate",
                f"must be 0 or >= {MIN_POSITIVE_RATE:g} (req/s), got {_show(total)}",
            )
        )
    cells = [v for row in _as_list(distribution) or [] for v in (_as_list(row) or [])]
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in cells)
    # The cells are >= 0, so a positive sum is a positive cell (which CEL can check cheaply).
    if (
        isinstance(total, int | float)
        and total > 0
        and cells
        and numbers
        and not any(v > 0 for v in cells)
    ):
        errors.append(
            FieldError(f"{p}workload.distribution", "must have a positive sum when totalRate > 0")
        )
    return errors


def _gpu_errors(raw: Any, p: str) -> list[FieldError]:
    """Each GPU type once, each target scaled by one entry, min <= max."""
    errors: list[FieldError] = []
    names: dict[str, int] = {}
    targets: dict[tuple[str, str, str], int] = {}
    for k, gpu in enumerate(_as_list(_get(raw, "gpus")) or []):
        if not isinstance(gpu, Mapping):
            continue
        gp = f"{p}gpus[{k}]"
        name = gpu.get("name")
        if isinstance(name, str):
            if name in names:
                errors.append(
                    FieldError(
                        f"{gp}.name", f"must be unique, {name!r} is also gpus[{names[name]}]"
                    )
                )
            names.setdefault(name, k)
        target = _target(gpu)
        if target is not None:
            if target in targets:
                errors.append(
                    FieldError(
                        f"{gp}.scaleTargetRef",
                        f"names the same target as {p}gpus[{targets[target]}] "
                        f"({target[1]}/{target[2]})",
                    )
                )
            targets.setdefault(target, k)
        low, high = _as_int(gpu.get("minReplicas", 0)), _as_int(gpu.get("maxReplicas"))
        if low is not None and high is not None and low > high:
            errors.append(
                FieldError(f"{gp}.maxReplicas", f"must be >= minReplicas ({low}), got {high}")
            )
    return errors


def _rate_source_errors(raw: Any, p: str) -> list[FieldError]:
    """The live sources' choices: one query, and a rate source for the distribution to follow."""
    errors: list[FieldError] = []
    for k, gpu in enumerate(_as_list(_get(raw, "gpus")) or []):
        source = gpu.get("costPerHourFrom") if isinstance(gpu, Mapping) else None
        if not isinstance(source, Mapping):
            continue
        path = f"{p}gpus[{k}].costPerHourFrom"
        if ("configMapKeyRef" in source) == ("prometheusQuery" in source):
            errors.append(
                FieldError(path, "set exactly one of configMapKeyRef and prometheusQuery")
            )
        if "prometheusQuery" in source and not isinstance(_get(raw, "rateSource"), Mapping):
            errors.append(
                FieldError(
                    f"{path}.prometheusQuery",
                    f"needs {p}rateSource (its Prometheus and credentials are used)",
                )
            )
    prometheus = _get(raw, "rateSource", "prometheus")
    path = f"{p}rateSource.prometheus"
    if isinstance(prometheus, Mapping):
        if ("query" in prometheus) == ("modelName" in prometheus):
            errors.append(FieldError(path, "set exactly one of query and modelName"))
        if "rangeSeconds" in prometheus and "modelName" not in prometheus:
            errors.append(
                FieldError(
                    f"{path}.rangeSeconds", "applies to the default query, which needs modelName"
                )
            )
    follow = _get(raw, "workload", "fromPrometheus")
    if follow is not None:
        if not isinstance(_get(raw, "rateSource"), Mapping):
            errors.append(
                FieldError(
                    f"{p}workload.fromPrometheus",
                    f"needs {p}rateSource (its Prometheus, credentials and interval are used)",
                )
            )
        elif (
            isinstance(follow, Mapping)
            and "modelName" not in follow
            and isinstance(prometheus, Mapping)
            and "modelName" not in prometheus
        ):
            errors.append(
                FieldError(
                    f"{p}workload.fromPrometheus.modelName",
                    f"is required when {path} has no modelName (the token histograms are "
                    "selected by vLLM's model_name label)",
                )
            )
    return errors


def _cross_field_errors(raw: Any, prefix: str) -> list[FieldError]:
    """Rules that relate fields to each other, checked on whatever parts are well-formed."""
    p = f"{prefix}." if prefix else ""
    return _matrix_errors(raw, p) + _gpu_errors(raw, p) + _rate_source_errors(raw, p)


def validate_spec(raw: Any, prefix: str = "spec") -> AllocationSpec:
    """Parse a raw spec mapping; raise `SpecError` listing every problem, each with its path.

    Everything the API server checks is checked here, but for one thing: `gpus[].scaleTargetRef`
    is optional, since `melange solve` plans without node pools (the operator requires it).
    """
    if not isinstance(raw, Mapping):
        raise SpecError([FieldError(prefix or "document", f"must be a mapping, got {_show(raw)}")])
    document = _without_nulls(raw)
    spec, errors = _parse(document, prefix)
    errors += _cross_field_errors(document, prefix)
    unique = list(dict.fromkeys(errors))
    if unique or spec is None:
        raise SpecError(unique)
    return spec


def resource_errors(spec: AllocationSpec, prefix: str = "spec") -> list[FieldError]:
    """What a MelangeAllocation object needs beyond a plannable spec, as its CRD requires: a node
    pool to scale per GPU type. A bare spec planned by `melange solve` needs none."""
    return [
        FieldError(f"{prefix}.gpus[{k}].scaleTargetRef", "is required")
        for k, gpu in enumerate(spec.gpus)
        if gpu.scale_target_ref is None
    ]


def validate_resource_spec(raw: Any, prefix: str = "spec") -> AllocationSpec:
    """`validate_spec` for the spec of a MelangeAllocation object (a manifest, or one stored)."""
    spec = validate_spec(raw, prefix)
    errors = resource_errors(spec, prefix)
    if errors:
        raise SpecError(errors)
    return spec


def parse_document(document: Any) -> Allocation:
    """Accept a full `MelangeAllocation` manifest or a bare spec (as `melange solve` does)."""
    if isinstance(document, Mapping) and "spec" in document:
        kind, api_version = document.get("kind"), document.get("apiVersion")
        errors = []
        if kind is not None and kind != KIND:
            errors.append(FieldError("kind", f"must be {KIND}, got {_show(kind)}"))
        if api_version is not None and api_version != f"{API_GROUP}/{API_VERSION}":
            errors.append(
                FieldError(
                    "apiVersion", f"must be {API_GROUP}/{API_VERSION}, got {_show(api_version)}"
                )
            )
        if errors:
            raise SpecError(errors)
        metadata = document.get("metadata") or {}
        validate = validate_resource_spec if kind == KIND else validate_spec
        return Allocation(
            spec=validate(document["spec"], "spec"),
            name=metadata.get("name") if isinstance(metadata, Mapping) else None,
            namespace=metadata.get("namespace") if isinstance(metadata, Mapping) else None,
        )
    return Allocation(spec=validate_spec(document, ""))


# Limits on a document before it is validated: what the API server would take, with room to spare.
# A request body there is at most 3 MiB; the largest allocation the CRD admits (32 x 32 buckets,
# 16 GPU types) is about 340 KB of JSON with every number at full precision, and holds about 17,000
# values, 6 levels deep.
MAX_DOCUMENT_BYTES = 3 * 1024 * 1024
MAX_DOCUMENT_VALUES = 200_000  # every YAML alias counted as the copy it stands for
MAX_DOCUMENT_DEPTH = 64

# The YAML 1.2 floats that YAML 1.1 (PyYAML) reads as strings: an exponent without a dot or without
# a sign (1e3, 1.5e10, .5E-3). kubectl reads them as numbers, and so must `melange solve`.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$")


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The safe loader (libyaml's parser when PyYAML was built with it: several times faster on
    large matrices), with YAML 1.2's exponent floats."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789"))


def _document_error(source: str, message: str) -> SpecError:
    return SpecError([FieldError("", f"{source}: {message}")])


def _check_size(document: Any, source: str) -> None:
    """Refuse a document nested too deeply (or referring to itself through an alias) or holding too
    many values once its aliases are expanded (a "billion laughs" bomb), before anything walks it."""
    sizes: dict[int, int] = {}

    def size(node: Any, depth: int) -> int:
        if depth > MAX_DOCUMENT_DEPTH:
            raise _document_error(
                source, f"nested more than {MAX_DOCUMENT_DEPTH} levels deep (or refers to itself)"
            )
        if not isinstance(node, dict | list):
            return 1
        known = sizes.get(id(node))
        if known is not None:
            return known
        children = node.values() if isinstance(node, dict) else node
        total = 1 + sum(size(child, depth + 1) for child in children)
        if total > MAX_DOCUMENT_VALUES:
            raise _document_error(
                source,
                f"holds more than {MAX_DOCUMENT_VALUES} values with its YAML aliases expanded "
                "(an allocation holds at most about 17,000)",
            )
        sizes[id(node)] = total
        return total

    size(document, 0)


def _yaml_error(exc: yaml.YAMLError) -> str:
    """PyYAML's error on one line: what is wrong, and where."""
    if isinstance(exc, yaml.MarkedYAMLError):
        what = ", ".join(part for part in (exc.context, exc.problem) if part)
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        text = f"{what}{where}"
    else:
        text = str(exc)
    return " ".join(text.split())


def load_document(text: str, source: str = "<input>") -> Any:
    """The one YAML (or JSON) document in `text`, not yet validated; JSON goes through the JSON
    parser. Every problem with the text itself (not YAML, several documents or none, too large, too
    deep, an alias bomb) is one `SpecError` naming `source`."""
    if len(text) > MAX_DOCUMENT_BYTES:
        raise _document_error(source, f"larger than {MAX_DOCUMENT_BYTES} bytes")
    if text.lstrip().startswith("{"):
        try:
            document = json.loads(text)
        except RecursionError:
            raise _document_error(
                source, f"nested more than {MAX_DOCUMENT_DEPTH} levels deep"
            ) from None
        except json.JSONDecodeError:
            pass  # YAML flow style also starts with "{"
        else:
            _check_size(document, source)
            return document
    try:
        documents = [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    except yaml.YAMLError as exc:
        raise _document_error(source, f"not valid YAML: {_yaml_error(exc)}") from None
    except RecursionError:
        raise _document_error(
            source, f"nested more than {MAX_DOCUMENT_DEPTH} levels deep"
        ) from None
    if not documents:
        raise _document_error(source, "holds no YAML document (is it empty?)")
    if len(documents) > 1:
        raise _document_error(
            source,
            f"holds {len(documents)} YAML documents; give each allocation a file of its own",
        )
    _check_size(documents[0], source)
    return documents[0]


def load_document_bytes(data: bytes, source: str = "<input>") -> Any:
    """`load_document` for a file's bytes: UTF-8 (a byte-order mark is allowed), at most
    `MAX_DOCUMENT_BYTES`."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise _document_error(source, f"larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _document_error(
            source, f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start}"
        ) from None
    return load_document(text, source)


def load_text(text: str, source: str = "<input>") -> Allocation:
    """The allocation in YAML or JSON `text`: `load_document`, then `parse_document` (whose
    problems name their fields)."""
    return parse_document(load_document(text, source))


def load_bytes(data: bytes, source: str = "<input>") -> Allocation:
    """`load_text` for a file's bytes."""
    return parse_document(load_document_bytes(data, source))


def bucket_label(edges_in: Sequence[int], edges_out: Sequence[int], i: int, j: int) -> str:
    """Name a bucket by its token ranges, as people read them in errors and tables."""
    return f"input {edges_in[i]}-{edges_in[i + 1]}, output {edges_out[j]}-{edges_out[j + 1]} tokens"
