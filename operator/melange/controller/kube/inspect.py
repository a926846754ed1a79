"""Read one allocation and its Events for `melange status`, as the API server stores them.

Kept apart from the operator's client (`client.KubeClient`): it only reads, as the person who runs
the command, and hands back plain dicts, so that the formatting (`melange.cli.status`) needs no
Kubernetes types. Every failure is one sentence naming the object or the server; whether the
allocation is missing (`AllocationNotFound`) is told apart from every other failure
(`InspectError`), since the command exits differently for each.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from melange import api
from melange.controller.kube.client import (
    CONNECT_TIMEOUT,
    GROUP,
    PLURAL,
    VERSION,
    CredentialsError,
    _reason,
    _root_cause,
    _sentence,
    in_pod,
    kubeconfig_namespace,
    kubeconfig_path,
    load_credentials,
    service_account_dir,
)

READ_TIMEOUT = 30.0  # seconds for the answer once connected: one object, then its Events


class InspectError(Exception):
    """No credentials, or a server that cannot be reached, refuses, or does not serve the CRD."""


class AllocationNotFound(Exception):
    """The API server answered: no such allocation in that namespace."""


@dataclass(frozen=True)
class Inspection:
    """What was read: the allocation as stored, its Events (None: they could not be listed,
    `events_error` says why)."""

    allocation: dict[str, Any]
    events: list[dict[str, Any]] | None
    events_error: str | None = None


def default_namespace(kubeconfig: str | None) -> str:
    """As kubectl picks it: in a pod without a kubeconfig, the pod's; else the kubeconfig
    context's; else `default`."""
    if not kubeconfig and in_pod():
        with contextlib.suppress(OSError):
            with open(os.path.join(service_account_dir(), "namespace")) as file:
                namespace = file.read().strip()
            if namespace:
                return namespace
    return kubeconfig_namespace(kubeconfig_path(kubeconfig)) or "default"


def read_allocation(name: str, namespace: str, kubeconfig: str | None = None) -> Inspection:
    """The allocation `namespace/name` and the Events about it (this object, by uid).

    One bounded attempt per request, no retries: a person waits for the answer. Listing the
    Events may be forbidden where reading the allocation is not; that is reported, not fatal.
    """
    try:
        credentials = load_credentials(kubeconfig)
    except CredentialsError as exc:
        raise InspectError(str(exc)) from None
    configuration = copy.deepcopy(credentials.configuration)
    configuration.retries = 0
    where = f"the API server {credentials.server} ({credentials.source})"
    timeout = (CONNECT_TIMEOUT, READ_TIMEOUT)
    with k8s.ApiClient(configuration) as api_client:
        try:
            allocation = k8s.CustomObjectsApi(api_client).get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=timeout
            )
        except ApiException as exc:
            raise _refused(exc, where, name, namespace) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise InspectError(f"cannot reach {where}: {_root_cause(exc)}") from None
        except Exception as exc:  # e.g. an exec credential plugin that fails
            raise InspectError(f"cannot reach {where}: {_sentence(exc)}") from None
        if not isinstance(allocation, dict):
            raise InspectError(f"{where} answered with no object for {namespace}/{name}")
        uid = (allocation.get("metadata") or {}).get("uid")
        selector = f"involvedObject.kind={api.KIND},involvedObject.name={name}"
        if uid:
            selector += f",involvedObject.uid={uid}"
        try:
            # the raw answer: the Events as the API serves them (times as stored, "Z")
            response: Any = k8s.CoreV1Api(api_client).list_namespaced_event(
                namespace,
                field_selector=selector,  # all of them (Events expire): the newest are wanted
                _request_timeout=timeout,
                _preload_content=False,
            )
            listed = json.loads(response.data)
        except ApiException as exc:
            return Inspection(allocation, None, f"the Events cannot be listed: {_reason(exc)}")
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            return Inspection(allocation, None, f"the Events cannot be listed: {_root_cause(exc)}")
    items = listed.get("items") if isinstance(listed, dict) else None
    events = [e for e in items if isinstance(e, dict)] if isinstance(items, list) else []
    return Inspection(allocation, events)


def _refused(exc: ApiException, where: str, name: str, namespace: str) -> Exception:
    """The error for an answer other than the object: missing, or the server's refusal."""
    if exc.status == 404:
        details = _details(exc)
        if details.get("name") == name:  # else the resource itself is missing: no CRD
            return AllocationNotFound(f"{api.KIND} {namespace}/{name} not found")
        return InspectError(f"{where} does not serve {GROUP}/{VERSION}: install the CRD first")
    if exc.status == 401:
        return InspectError(f"{where} rejected the credentials (401 Unauthorized): {_reason(exc)}")
    if exc.status == 403:
        return InspectError(
            f"{where} refused to show {namespace}/{name} (403 Forbidden): {_reason(exc)}"
        )
    if not exc.status:  # the client's own wrapping of a TLS failure
        return InspectError(f"cannot reach {where}: {_sentence(exc)}")
    return InspectError(f"{where} answered {exc.status}: {_reason(exc)}")


def _details(exc: ApiException) -> dict[str, Any]:
    """The `details` of the API server's Status in the error's body, if it sent one."""
    body = getattr(exc, "body", None)
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    with contextlib.suppress(ValueError, TypeError):
        details = json.loads(body).get("details") if isinstance(body, str) else None
        if isinstance(details, dict):
            return details
    return {}
