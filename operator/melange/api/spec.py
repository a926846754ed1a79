"""Typed model of the `MelangeAllocation` spec, and its validation.

Pydantic checks each field on its own (types, bounds, finiteness, unknown keys); the cross-field rules
(matrix shapes against the bucket edges, unique names, min <= max) run over the raw document as well,
so one pass reports every error at once, each naming its field path and the offending value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

API_GROUP = "melange.dev"
API_VERSION = "v1alpha1"
KIND = "MelangeAllocation"
MAX_SLICE_FACTOR = 1024

NonNegativeNumber = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Model(BaseModel):
    """Base: camelCase names as in the manifest, unknown keys rejected (typos never pass silently)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Buckets(_Model):
    input_tokens: list[int] = Field(alias="inputTokens", min_length=2)
    output_tokens: list[int] = Field(alias="outputTokens", min_length=2)


class DistributionSource(_Model):
    """Follow the live request-size distribution: vLLM's prompt and generation token histograms.

    Their increase over `windowSeconds` gives the matrix's row and column sums; the joint matrix is
    fitted to them from `workload.distribution` (iterative proportional fitting). Read from
    `rateSource.prometheus` (its URL and credentials), for `modelName` (default: the rate source's).
    """

    window_seconds: int = Field(default=3600, alias="windowSeconds", ge=10, le=7 * 86400)
    drift_tolerance: float = Field(
        default=0.1, alias="driftTolerance", gt=0, le=1, allow_inf_nan=False
    )
    min_requests: float = Field(default=100, alias="minRequests", ge=0, allow_inf_nan=False)
    model_name: str | None = Field(default=None, alias="modelName", min_length=1, max_length=253)


class Workload(_Model):
    distribution: list[list[NonNegativeNumber]]
    total_rate: float = Field(alias="totalRate", ge=0, allow_inf_nan=False)
    from_prometheus: DistributionSource | None = Field(default=None, alias="fromPrometheus")


class ObjectReference(_Model):
    """A scalable object in the allocation's namespace (as HPA's CrossVersionObjectReference)."""

    api_version: str = Field(alias="apiVersion", min_length=1)
    kind: str = Field(min_length=1)
    name: str = Field(min_length=1)


class GpuType(_Model):
    name: str = Field(min_length=1, max_length=63)
    cost_per_hour: float = Field(alias="costPerHour", gt=0, allow_inf_nan=False)
    throughput: list[list[NonNegativeNumber]]
    min_replicas: int = Field(default=0, alias="minReplicas", ge=0)
    max_replicas: int | None = Field(default=None, alias="maxReplicas", ge=0)
    scale_target_ref: ObjectReference | None = Field(default=None, alias="scaleTargetRef")
    replicas_path: str | None = Field(default=None, alias="replicasPath", pattern=r"^(/[^/]+)+$")


class SecretKeyRef(_Model):
    name: str = Field(min_length=1)
    key: str = Field(min_length=1)


class PrometheusSource(_Model):
    url: str = Field(pattern=r"^https?://")
    query: str | None = None
    # Without `query`: vLLM's request rate for the series labelled model_name=<modelName>,
    # rate() over `rangeSeconds` (default 120).
    model_name: str | None = Field(default=None, alias="modelName", min_length=1, max_length=253)
    range_seconds: int | None = Field(default=None, alias="rangeSeconds", ge=1, le=86400)
    bearer_token_secret_ref: SecretKeyRef | None = Field(default=None, alias="bearerTokenSecretRef")
    ca_config_map_ref: SecretKeyRef | None = Field(default=None, alias="caConfigMapRef")


class RateSource(_Model):
    prometheus: PrometheusSource
    interval_seconds: int = Field(default=30, alias="intervalSeconds", ge=5, le=3600)
    drift_tolerance: float = Field(
        default=0.1, alias="driftTolerance", ge=0, le=10, allow_inf_nan=False
    )
    scale_down_stabilization_seconds: int = Field(
        default=300, alias="scaleDownStabilizationSeconds", ge=0, le=86400
    )


class AllocationSpec(_Model):
    buckets: Buckets
    workload: Workload
    gpus: list[GpuType] = Field(min_length=1)
    slice_factor: int = Field(default=8, alias="sliceFactor", ge=1, le=MAX_SLICE_FACTOR)
    headroom: float = Field(default=0.0, ge=0, le=10, allow_inf_nan=False)
    rate_source: RateSource | None = Field(default=None, alias="rateSource")
    dry_run: bool = Field(default=False, alias="dryRun")


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


def _join(prefix: str, loc: Sequence[str | int]) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        return str(int(value))
    return str(value)


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
    if kind == "extra_forbidden":
        return "is not a known field"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} items, got {ctx.get('actual_length')}"
    if kind in {"int_type", "int_parsing", "int_from_float"}:
        return f"must be an integer, got {_show(value)}"
    if kind in {"float_type", "float_parsing"}:
        return f"must be a number, got {_show(value)}"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')}, got {_show(value)}"
    if kind == "list_type":
        return f"must be a list, got {_show(value)}"
    if kind in {"model_type", "model_attributes_type", "dict_type"}:
        return f"must be a mapping, got {_show(value)}"
    return f"{error['msg'][0].lower()}{error['msg'][1:]}, got {_show(value)}"


def _field_errors(raw: Any, prefix: str) -> list[FieldError]:
    try:
        AllocationSpec.model_validate(raw)
    except ValidationError as exc:
        return [
            FieldError(_join(prefix, e["loc"]), _pydantic_message(e))
            for e in exc.errors(include_url=False)
        ]
    return []


def _as_list(value: Any) -> list[Any] | None:
    return value if isinstance(value, list) else None


def _shape_errors(matrix: Any, rows: int, cols: int, path: str) -> Iterator[FieldError]:
    items = _as_list(matrix)
    if items is None:
        return
    if len(items) != rows:
        yield FieldError(path, f"must have {rows} rows (one per input bucket), got {len(items)}")
    for i, row in enumerate(items):
        row_items = _as_list(row)
        if row_items is not None and len(row_items) != cols:
            yield FieldError(
                f"{path}[{i}]",
                f"must have {cols} columns (one per output bucket), got {len(row_items)}",
            )


def _edge_errors(edges: Any, path: str) -> tuple[list[FieldError], int | None]:
    """Edges must be strictly increasing positive integers; returns the errors and bucket count."""
    items = _as_list(edges)
    if items is None or not all(isinstance(e, int) and not isinstance(e, bool) for e in items):
        return [], None
    errors = [
        FieldError(f"{path}[{k}]", f"must be >= 1, got {e}") for k, e in enumerate(items) if e < 1
    ]
    errors += [
        FieldError(
            f"{path}[{k + 1}]",
            f"must be greater than the previous edge {items[k]}, got {items[k + 1]}",
        )
        for k in range(len(items) - 1)
        if items[k + 1] <= items[k]
    ]
    return errors, (len(items) - 1 if len(items) >= 2 else None)


def _get(raw: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(raw, Mapping):
            return None
        raw = raw.get(key)
    return raw


def _cross_field_errors(raw: Any, prefix: str) -> list[FieldError]:
    """Rules that relate fields to each other, checked on whatever parts are well-formed."""
    p = f"{prefix}." if prefix else ""
    errors: list[FieldError] = []
    in_errors, rows = _edge_errors(_get(raw, "buckets", "inputTokens"), f"{p}buckets.inputTokens")
    out_errors, cols = _edge_errors(
        _get(raw, "buckets", "outputTokens"), f"{p}buckets.outputTokens"
    )
    errors += in_errors + out_errors
    distribution = _get(raw, "workload", "distribution")
    if rows is not None and cols is not None:
        errors += _shape_errors(distribution, rows, cols, f"{p}workload.distribution")
    total = _get(raw, "workload", "totalRate")
    dist_rows = _as_list(distribution) or []
    cells = [v for row in dist_rows for v in (_as_list(row) or [])]
    if (
        isinstance(total, int | float)
        and total > 0
        and cells
        and all(isinstance(v, int | float) for v in cells)
        and sum(cells) <= 0
    ):
        errors.append(
            FieldError(f"{p}workload.distribution", "must have a positive sum when totalRate > 0")
        )
    gpus = _as_list(_get(raw, "gpus")) or []
    seen: dict[str, int] = {}
    for k, gpu in enumerate(gpus):
        if not isinstance(gpu, Mapping):
            continue
        gp = f"{p}gpus[{k}]"
        name = gpu.get("name")
        if isinstance(name, str):
            if name in seen:
                errors.append(
                    FieldError(f"{gp}.name", f"must be unique, {name!r} is also gpus[{seen[name]}]")
                )
            seen.setdefault(name, k)
        if rows is not None and cols is not None:
            errors += _shape_errors(gpu.get("throughput"), rows, cols, f"{gp}.throughput")
        low, high = gpu.get("minReplicas", 0), gpu.get("maxReplicas")
        if isinstance(low, int) and isinstance(high, int) and low > high:
            errors.append(
                FieldError(f"{gp}.maxReplicas", f"must be >= minReplicas ({low}), got {high}")
            )
    return errors


def validate_spec(raw: Any, prefix: str = "spec") -> AllocationSpec:
    """Parse a raw spec mapping; raise `SpecError` listing every problem, each with its path."""
    if not isinstance(raw, Mapping):
        raise SpecError([FieldError(prefix or "document", f"must be a mapping, got {_show(raw)}")])
    errors = _field_errors(raw, prefix) + _cross_field_errors(raw, prefix)
    unique = list(dict.fromkeys(errors))
    if unique:
        raise SpecError(unique)
    return AllocationSpec.model_validate(raw)


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
        return Allocation(
            spec=validate_spec(document["spec"], "spec"),
            name=metadata.get("name") if isinstance(metadata, Mapping) else None,
            namespace=metadata.get("namespace") if isinstance(metadata, Mapping) else None,
        )
    return Allocation(spec=validate_spec(document, ""))


# libyaml's parser when PyYAML was built with it: several times faster on large matrices
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_text(text: str, source: str = "<input>") -> Allocation:
    """Parse YAML (or JSON) text holding one allocation; JSON goes through the JSON parser."""
    if text.lstrip().startswith("{"):
        try:
            return parse_document(json.loads(text))
        except json.JSONDecodeError:
            pass  # YAML flow style also starts with "{"
    try:
        documents = [d for d in yaml.load_all(text, Loader=_YAML_LOADER) if d is not None]
    except yaml.YAMLError as exc:
        raise SpecError([FieldError("", f"{source}: not valid YAML: {exc}")]) from exc
    if len(documents) != 1:
        raise SpecError(
            [FieldError("", f"{source}: must hold exactly one document, got {len(documents)}")]
        )
    return parse_document(documents[0])


def bucket_label(edges_in: Sequence[int], edges_out: Sequence[int], i: int, j: int) -> str:
    """Name a bucket by its token ranges, as people read them in errors and tables."""
    return f"input {edges_in[i]}-{edges_in[i + 1]}, output {edges_out[j]}-{edges_out[j + 1]} tokens"
