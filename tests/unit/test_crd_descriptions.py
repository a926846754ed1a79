"""The CRD explains itself: `kubectl explain mla.spec` and `mla.status` read each field's
`description`, so every property under spec and status has one; and the CRD's spec and the model in
`melange.api.spec` name the same fields (the same rules on them are proven by
tests/e2e/test_spec_parity.py)."""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from melange.api.spec import AllocationSpec

CRD_FILE = Path(__file__).parents[2] / "crds" / "melangeallocations.melange.dev.yaml"


def schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_FILE.read_text())
    (version,) = crd["spec"]["versions"]
    root: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return root


def properties(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every property below `node`, as (path, schema): nested objects' properties as `a.b`, an
    array's items' as `a[].b` (through arrays of arrays too)."""
    for name, child in (node.get("properties") or {}).items():
        child_path = f"{path}.{name}" if path else name
        yield child_path, child
        yield from properties(child, child_path)
    if "items" in node:
        yield from properties(node["items"], f"{path}[]")


def crd_paths(top: str) -> set[str]:
    node = schema()["properties"][top]
    return {path for path, _ in properties(node, "")}


@pytest.mark.parametrize("top", ["spec", "status"])
def test_every_property_has_a_description(top: str) -> None:
    node = schema()["properties"][top]
    blank = [
        path
        for path, child in [(top, node), *properties(node, top)]
        if not str(child.get("description") or "").strip()
    ]
    assert blank == [], f"properties without a description: {blank}"


def test_the_walk_reaches_nested_objects_and_array_items() -> None:
    """The walk above goes into objects and arrays' items alike (else it would prove little)."""
    spec, status = crd_paths("spec"), crd_paths("status")
    assert "gpus[].scaleTargetRef.apiVersion" in spec
    assert "gpus[].costPerHourFrom.configMapKeyRef.key" in spec
    assert "rateSource.prometheus.bearerTokenSecretRef.name" in spec
    assert "transition.readyTimeoutSeconds" in spec
    assert "routing[].shares[].fraction" in status
    assert "targets[].readyReplicas" in status
    assert "conditions[].lastTransitionTime" in status


def _models(annotation: Any) -> Iterator[type[BaseModel]]:
    """The pydantic models a field's type holds (through Optional, list and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for argument in typing.get_args(annotation):
            yield from _models(argument)


def _is_list(annotation: Any) -> bool:
    """Whether the field is a list (of models, when it holds any), through Optional and Annotated."""
    origin = typing.get_origin(annotation)
    if origin is list:
        return True
    if origin is typing.Annotated:
        return _is_list(typing.get_args(annotation)[0])
    if isinstance(annotation, types.UnionType) or origin is typing.Union:
        return any(_is_list(argument) for argument in typing.get_args(annotation))
    return False


def model_paths(model: type[BaseModel], path: str = "") -> set[str]:
    """Every field of the model by its manifest name (its alias), as `crd_paths` names them."""
    paths = set()
    for name, field in model.model_fields.items():
        field_path = f"{path}.{field.alias or name}" if path else field.alias or name
        paths.add(field_path)
        nested = f"{field_path}[]" if _is_list(field.annotation) else field_path
        for inner in _models(field.annotation):
            paths |= model_paths(inner, nested)
    return paths


def test_the_model_walk_finds_nested_and_listed_models() -> None:
    paths = model_paths(AllocationSpec)
    assert "gpus[].scaleTargetRef.apiVersion" in paths
    assert "workload.fromPrometheus.modelName" in paths
    assert "rateSource.prometheus.caConfigMapRef.key" in paths
    assert "workload.distribution" in paths


def test_the_crd_and_the_model_name_the_same_spec_fields() -> None:
    crd, model = crd_paths("spec"), model_paths(AllocationSpec)
    assert sorted(crd - model) == [], "in the CRD only"
    assert sorted(model - crd) == [], "in the model only"
