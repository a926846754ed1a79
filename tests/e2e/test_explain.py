"""`kubectl explain mla.spec` reads the OpenAPI v3 document the API server publishes for the group:
every description in the CRD must come through there, nested objects and array items included."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from melange import api
from tests.e2e.kube import Kube, eventually

pytestmark = pytest.mark.e2e

OPENAPI_PATH = f"/openapi/v3/apis/{api.API_GROUP}/{api.API_VERSION}"
CRD_NAME = "melangeallocations.melange.dev"
CRD_KIND = ("apiextensions.k8s.io/v1", "CustomResourceDefinition")


def descriptions(node: dict[str, Any], path: str) -> Iterator[tuple[str, str | None]]:
    """(path, description) of every property below `node`: `a.b` in objects, `a[].b` in arrays."""
    for name, child in (node.get("properties") or {}).items():
        child_path = f"{path}.{name}"
        yield child_path, child.get("description")
        yield from descriptions(child, child_path)
    if "items" in node:
        yield from descriptions(node["items"], f"{path}[]")


def published_schema(kube: Kube) -> dict[str, Any]:
    """The MelangeAllocation schema in the group's OpenAPI v3 document, as kubectl fetches it."""
    request = kube.api_client.param_serialize(
        "GET",
        OPENAPI_PATH,
        header_params={"Accept": "application/json"},
        auth_settings=["BearerToken"],
    )
    response = kube.api_client.call_api(*request)
    response.read()
    assert response.status == 200, (response.status, response.data[:500])
    document = json.loads(response.data)
    schemas = document["components"]["schemas"]
    found = [
        schema
        for schema in schemas.values()
        if {"group": api.API_GROUP, "version": api.API_VERSION, "kind": api.KIND}
        in schema.get("x-kubernetes-group-version-kind", [])
    ]
    assert len(found) == 1, sorted(schemas)
    schema: dict[str, Any] = found[0]
    return schema


def stored_schema(kube: Kube) -> dict[str, Any]:
    """The CRD's schema as the API server holds it (the session applied crds/ to it)."""
    crd = kube.dynamic.get(kube.resource(CRD_KIND), name=CRD_NAME).to_dict()
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == api.API_VERSION]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def test_the_published_openapi_carries_every_description(kube: Kube) -> None:
    def check() -> dict[str, str | None]:
        stored, published = stored_schema(kube), published_schema(kube)
        expected, got = {}, {}
        for top in ("spec", "status"):
            expected[top] = stored["properties"][top].get("description")
            expected.update(descriptions(stored["properties"][top], top))
            got[top] = published["properties"][top].get("description")
            got.update(descriptions(published["properties"][top], top))
        assert got == expected  # the OpenAPI document follows a CRD change a little later
        return got

    published = eventually(check, timeout=60, interval=0.5)

    blank = sorted(path for path, text in published.items() if not (text or "").strip())
    assert blank == []
    assert len(published) > 100
    # two that `kubectl explain` is asked for often, deep in an object and in an array's items
    assert "(default 600)" in (published["spec.transition.readyTimeoutSeconds"] or "")
    assert "Ready replicas" in (published["status.targets[].readyReplicas"] or "")
