"""Read and set a node pool's replica count: any kind with a scale subresource, or a field path.

Blocking Kubernetes client calls (the `kubernetes` package's dynamic client, which resolves any kind
through discovery); the handlers run them in a worker thread. Errors come back as one plain sentence
that names the target, for the `Scaled` condition.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import (
    ConflictError,
    ForbiddenError,
    NotFoundError,
    ResourceNotFoundError,
    ResourceNotUniqueError,
)

from melange.api import ObjectReference

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
CONFLICT_RETRIES = 3


class ScaleError(Exception):
    """The target could not be read or patched; the message says why, for people."""


@dataclass(frozen=True)
class Change:
    previous: int
    current: int

    @property
    def patched(self) -> bool:
        return self.previous != self.current


def new_api_client(kubeconfig: str | None = None) -> k8s.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig (KUBECONFIG or ~/.kube)."""
    configuration = k8s.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)
    except k8s_config.ConfigException:
        k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return k8s.ApiClient(configuration)


def _pointer_get(document: Any, pointer: str) -> Any:
    node = document
    for part in pointer.strip("/").split("/"):
        key = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _reason(exc: ApiException) -> str:
    """The API server's own message (Status.message) when it gave one."""
    body = getattr(exc, "body", None)
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str):
        with contextlib.suppress(ValueError):
            message = json.loads(body).get("message")
            if message:
                return str(message)
    return str(getattr(exc, "reason", "") or exc)


class Scaler:
    """Reads and patches replica counts of objects of any kind, in one namespace at a time."""

    def __init__(self, api_client: k8s.ApiClient) -> None:
        self._dynamic = DynamicClient(api_client)

    def _resource(self, ref: ObjectReference) -> Any:
        for attempt in range(2):
            try:
                return self._dynamic.resources.get(api_version=ref.api_version, kind=ref.kind)
            except (ResourceNotFoundError, ResourceNotUniqueError):
                if attempt == 0:  # a CRD installed after start-up: look again before giving up
                    self._dynamic.resources.invalidate_cache()
        raise ScaleError(f"the API server serves no kind {ref.kind} in {ref.api_version}")

    def _read(self, namespace: str, ref: ObjectReference, replicas_path: str | None) -> int | None:
        """The replica count, or None when the field at `replicas_path` is not set."""
        resource = self._resource(ref)
        try:
            if replicas_path:
                obj = self._dynamic.get(resource, name=ref.name, namespace=namespace).to_dict()
                value = _pointer_get(obj, replicas_path)
                if value is None:
                    return None
                if not isinstance(value, int):
                    raise ScaleError(f"{replicas_path} is not an integer: {value!r}")
                return value
            scale = self._scale_subresource(resource, ref)
            obj = self._dynamic.get(scale, name=ref.name, namespace=namespace).to_dict()
            return int((obj.get("spec") or {}).get("replicas") or 0)
        except NotFoundError:
            raise ScaleError(f"not found in namespace {namespace}") from None
        except ForbiddenError as exc:
            raise ScaleError(f"forbidden: {_reason(exc)}") from None
        except ApiException as exc:
            raise ScaleError(f"cannot read: {_reason(exc)}") from None

    def _scale_subresource(self, resource: Any, ref: ObjectReference) -> Any:
        scale = resource.subresources.get("scale")
        if scale is None:
            raise ScaleError(f"kind {ref.kind} has no scale subresource; set replicasPath")
        return scale

    def ensure_replicas(
        self, namespace: str, ref: ObjectReference, replicas_path: str | None, desired: int
    ) -> Change:
        """Patch the replica count to `desired`, and only if it differs (level-based, idempotent)."""
        for _ in range(CONFLICT_RETRIES):
            read = self._read(namespace, ref, replicas_path)
            current = 0 if read is None else read
            if current == desired:
                return Change(current, desired)
            try:
                self._patch(namespace, ref, replicas_path, read, desired)
            except ConflictError:
                continue  # changed under us between read and write: read again
            except NotFoundError:
                raise ScaleError(f"not found in namespace {namespace}") from None
            except ForbiddenError as exc:
                raise ScaleError(f"forbidden: {_reason(exc)}") from None
            except ApiException as exc:
                if exc.status == 422 and replicas_path:  # the JSON Patch `test` op failed
                    continue
                raise ScaleError(f"cannot patch: {_reason(exc)}") from None
            return Change(current, desired)
        raise ScaleError(f"kept changing while being patched ({CONFLICT_RETRIES} attempts)")

    def _patch(
        self,
        namespace: str,
        ref: ObjectReference,
        replicas_path: str | None,
        current: int | None,
        desired: int,
    ) -> None:
        """Write `desired`; `current` is what was just read (None: the field at the path is unset)."""
        resource = self._resource(ref)
        if replicas_path:
            # `test` makes the write conditional on what was read, like a resourceVersion would.
            body: Any = (
                [{"op": "add", "path": replicas_path, "value": desired}]
                if current is None
                else [
                    {"op": "test", "path": replicas_path, "value": current},
                    {"op": "replace", "path": replicas_path, "value": desired},
                ]
            )
            self._dynamic.patch(
                resource, body=body, name=ref.name, namespace=namespace, content_type=JSON_PATCH
            )
            return
        self._dynamic.patch(
            self._scale_subresource(resource, ref),
            body={"spec": {"replicas": desired}},
            name=ref.name,
            namespace=namespace,
            content_type=MERGE_PATCH,
        )
