"""The operator's one Kubernetes client: node-pool replicas, allocation status, Events, Secrets,
and the leader Lease.

Blocking calls of the `kubernetes` package (its dynamic client resolves any kind through
discovery); the controller runs them in worker threads. Every write carries the field manager
`melange-operator` and a user agent naming this replica, and is refused here, just before it is
sent, when `may_write` says this replica no longer leads: a replica that lost its Lease never
writes. Errors come back as one plain sentence that names the object, for conditions and Events.

The credentials (`load_credentials`: a kubeconfig, or the pod's service account) are loaded at
start and again at each Kopf login; `check_connection` asks the API server once, bounded.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import json
import os
import random
import ssl
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config import incluster_config
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import (
    ConflictError,
    ForbiddenError,
    NotFoundError,
    ResourceNotFoundError,
    ResourceNotUniqueError,
)

from melange import api
from melange.controller.errors import NotLeader, PublishError, ScaleError, StatusGone
from melange.controller.lease import LeaseRecord
from melange.signals import prices
from melange.signals.rates import CredentialsUnavailable

FIELD_MANAGER = "melange-operator"
COMPONENT = "melange-operator"
GROUP, VERSION, PLURAL = api.API_GROUP, api.API_VERSION, "melangeallocations"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
# a LIST of the objects' metadata only (the API server's PartialObjectMetadataList), else JSON
METADATA_ONLY = "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io,application/json"
LIST_PAGE = 500
LIST_TIMEOUT = 30.0
CONFLICT_RETRIES = 6
# Between attempts after a conflict, a random pause of up to 50 ms, doubling each time (at most
# 1.55 s in all), so that a writer as fast as the operator does not win every race.
CONFLICT_BACKOFF_SECONDS = 0.05
# A Secret or ConfigMap that rate sources may use carries this label with the value "true", put
# there by whoever owns it: writing an allocation that names it is not enough.
CREDENTIALS_LABEL = "melange.dev/rate-source-credentials"


@dataclass(frozen=True)
class Replicas:
    """A pool's replica count as read, with the version it was read at (the write's precondition)."""

    value: int | None  # None: the field at replicasPath is not set
    resource_version: str | None
    ready: int | None = None  # at the ready path, when one was asked for and the target shows it


@dataclass(frozen=True)
class Change:
    previous: int
    current: int

    @property
    def patched(self) -> bool:
        return self.previous != self.current


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SERVICE_ACCOUNT_DIR_ENV = "MELANGE_SERVICE_ACCOUNT_DIR"
CONNECT_TIMEOUT = 5.0


class CredentialsError(Exception):
    """No usable credentials, or an API server that cannot be reached or refuses them: one
    sentence naming the kubeconfig or the server."""


@dataclass(frozen=True)
class Credentials:
    """Where the operator connects, and as whom: loaded once, then reloaded on each login."""

    configuration: k8s.Configuration
    in_cluster: bool
    source: str  # "kubeconfig PATH" or "the service account in DIR"
    kubeconfig: str | None  # what the credentials were loaded with (None: in-cluster first)

    @property
    def server(self) -> str:
        return str(self.configuration.host)

    def reload(self) -> Credentials:
        return load_credentials(self.kubeconfig)

    def api_client(self, user_agent: str | None = None) -> k8s.ApiClient:
        api_client = k8s.ApiClient(self.configuration)
        if user_agent:
            api_client.user_agent = user_agent
        return api_client

    def bearer(self) -> tuple[str | None, str | None]:
        """(scheme, token) of the Authorization header the credentials send, if any."""
        header = self.configuration.get_api_key_with_prefix(
            "BearerToken"
        ) or self.configuration.get_api_key_with_prefix("authorization")
        parts = header.split(" ", 1) if header else []
        if not parts:
            return None, None
        return (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def _sentence(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def service_account_dir() -> str:
    return os.environ.get(SERVICE_ACCOUNT_DIR_ENV) or SERVICE_ACCOUNT_DIR


def in_pod() -> bool:
    """The pod's environment is there: the API server's address and a service-account token."""
    return bool(
        os.environ.get("KUBERNETES_SERVICE_HOST")
        and os.environ.get("KUBERNETES_SERVICE_PORT")
        and os.path.isfile(os.path.join(service_account_dir(), "token"))
    )


def kubeconfig_path(kubeconfig: str | None) -> str:
    """The kubeconfig `melange run` reads: the one given, else $KUBECONFIG, else ~/.kube/config."""
    return os.path.expanduser(kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config")


def load_credentials(kubeconfig: str | None = None) -> Credentials:
    """`kubeconfig` when given; else the in-cluster service account in a pod; else $KUBECONFIG
    or ~/.kube/config. Reads files only; CredentialsError says what is missing or broken."""
    configuration = k8s.Configuration()
    if not kubeconfig and in_pod():
        directory = service_account_dir()
        loader = incluster_config.InClusterConfigLoader(
            token_filename=os.path.join(directory, "token"),
            cert_filename=os.path.join(directory, "ca.crt"),
        )
        try:
            loader.load_and_set(configuration)
        except (k8s_config.ConfigException, OSError) as exc:
            raise CredentialsError(
                f"the service account in {directory} cannot be used: {_sentence(exc)}"
            ) from None
        return Credentials(configuration, True, f"the service account in {directory}", None)
    path = kubeconfig_path(kubeconfig)
    paths = [p for p in path.split(os.pathsep) if p]
    if not any(os.path.isfile(p) for p in paths):
        if kubeconfig:
            raise CredentialsError(f"--kubeconfig {path}: no such file")
        pod = (
            f"no service-account token in {service_account_dir()}"
            if os.environ.get("KUBERNETES_SERVICE_HOST")
            else "not in a pod"
        )
        hint = (
            "from KUBECONFIG" if os.environ.get("KUBECONFIG") else "set --kubeconfig or KUBECONFIG"
        )
        raise CredentialsError(
            f"no Kubernetes credentials: {pod}, and no kubeconfig at {path} ({hint})"
        )
    try:
        k8s_config.load_kube_config(config_file=path, client_configuration=configuration)
    except Exception as exc:  # a YAML, I/O or config error: one line, not a traceback
        raise CredentialsError(f"kubeconfig {path}: {_sentence(exc)}") from None
    return Credentials(configuration, False, f"kubeconfig {path}", kubeconfig)


def _root_cause(exc: BaseException) -> str:
    """What a failed connection came down to: `connection refused`, `timed out`, a TLS error."""
    chain: list[BaseException] = []
    node: BaseException | None = exc
    while node is not None and node not in chain:
        chain.append(node)
        nested = getattr(node, "reason", None)
        node = nested if isinstance(nested, BaseException) else (node.__cause__ or node.__context__)
    for link in chain:
        if isinstance(link, ssl.SSLError):
            return f"TLS: {_sentence(link)}"
        if isinstance(link, OSError) and link.strerror and not isinstance(link, TimeoutError):
            return str(link.strerror)[:1].lower() + str(link.strerror)[1:]
    for link in chain:
        if isinstance(link, TimeoutError) or (
            isinstance(link, urllib3.exceptions.TimeoutError)
            and not isinstance(link, urllib3.exceptions.NewConnectionError)
        ):
            return "timed out"
    return _sentence(chain[-1])


def check_connection(credentials: Credentials, timeout: float = CONNECT_TIMEOUT) -> None:
    """One request, bounded by `timeout`, no retries: the operator's API group's discovery, as
    the credentials' user. CredentialsError when the server cannot be reached, rejects the
    credentials, refuses them the group, or does not serve it (the CRD is not installed)."""
    configuration = copy.deepcopy(credentials.configuration)
    configuration.retries = 0
    where = f"the API server {credentials.server} ({credentials.source})"
    try:
        with k8s.ApiClient(configuration) as api_client:
            k8s.CustomObjectsApi(api_client).get_api_resources(
                GROUP, VERSION, _request_timeout=(timeout, timeout)
            )
    except ApiException as exc:
        if exc.status == 401:
            raise CredentialsError(
                f"{where} rejected the credentials (401 Unauthorized): {_reason(exc)}"
            ) from None
        if exc.status == 403:
            raise CredentialsError(
                f"{where} refused access to {GROUP}/{VERSION} (403 Forbidden): {_reason(exc)}"
            ) from None
        if exc.status == 404:
            raise CredentialsError(
                f"{where} does not serve {GROUP}/{VERSION}: install the CRD first"
            ) from None
        raise CredentialsError(f"{where} answered {exc.status}: {_reason(exc)}") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise CredentialsError(f"cannot reach {where}: {_root_cause(exc)}") from None
    except Exception as exc:  # e.g. an exec plugin that fails
        raise CredentialsError(f"cannot reach {where}: {_sentence(exc)}") from None


def new_api_client(kubeconfig: str | None = None, user_agent: str | None = None) -> k8s.ApiClient:
    """A client with `load_credentials(kubeconfig)`."""
    return load_credentials(kubeconfig).api_client(user_agent)


def kubeconfig_namespace(kubeconfig: str | None) -> str | None:
    """The namespace of the kubeconfig's current context, if it names one."""
    with contextlib.suppress(Exception):
        _, context = k8s_config.list_kube_config_contexts(config_file=kubeconfig)
        namespace = (context or {}).get("context", {}).get("namespace")
        return str(namespace) if namespace else None
    return None


def _pointer_get(document: Any, pointer: str) -> Any:
    node = document
    for part in pointer.strip("/").split("/"):
        key = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _pointer_int(document: Any, pointer: str) -> int | None:
    value = _pointer_get(document, pointer)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ScaleError(f"{pointer} is not an integer: {value!r}")
    return value


def _ready_count(document: Any, pointer: str, reports_status: bool) -> int | None:
    """The ready count at `pointer`, or None for a target that cannot show one.

    An absent field is 0 when the kind has a status subresource (its controller reports there:
    Deployments and MachineDeployments omit `readyReplicas` at 0, and a new object has no status
    until its controller first sees it) or when the field's parent is there; otherwise the kind
    has no ready count and the target counts as ready at once.
    """
    value = _pointer_int(document, pointer)
    if value is None:
        parent = pointer.rsplit("/", 1)[0]
        if reports_status or not parent or isinstance(_pointer_get(document, parent), dict):
            return 0
    return value


def _not_found(namespace: str | None) -> str:
    return f"not found in namespace {namespace}" if namespace else "not found (cluster-scoped)"


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


def _owner_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "api_version": f"{GROUP}/{VERSION}",
        "kind": api.KIND,
        "name": owner["name"],
        "uid": owner["uid"],
        "controller": True,
    }


def _owned_by(obj: Any, uid: str) -> bool:
    """Whether `obj` names the object `uid` among its owners."""
    references = (obj.metadata.owner_references if obj.metadata else None) or []
    return any(r.uid == uid for r in references)


def _publish_error(where: str, exc: ApiException) -> PublishError:
    if exc.status == 403:
        return PublishError(
            "Forbidden",
            f"{where}: forbidden (RBAC): the operator may not write ConfigMaps here "
            "(the chart grants it with rbac.routingConfigMaps)",
        )
    return PublishError("WriteFailed", f"{where}: {_reason(exc)}")


class KubeClient:
    """All of the operator's reads and writes. `may_write` is asked right before every write."""

    def __init__(
        self,
        api_client: k8s.ApiClient,
        identity: str,
        may_write: Callable[[], bool] = lambda: True,
    ) -> None:
        self.identity = identity
        self.may_write = may_write
        self._dynamic = DynamicClient(api_client)
        self._core = k8s.CoreV1Api(api_client)
        self._custom = k8s.CustomObjectsApi(api_client)
        self._coordination = k8s.CoordinationV1Api(api_client)

    def _guard(self) -> None:
        if not self.may_write():
            raise NotLeader("this replica does not hold the leader Lease")

    # -- scale targets

    def _resource(self, ref: api.ObjectReference) -> Any:
        for attempt in range(2):
            try:
                return self._dynamic.resources.get(api_version=ref.api_version, kind=ref.kind)
            except (ResourceNotFoundError, ResourceNotUniqueError):
                if attempt == 0:  # a CRD installed after start-up: look again before giving up
                    self._dynamic.resources.invalidate_cache()
        raise ScaleError(f"the API server serves no kind {ref.kind} in {ref.api_version}")

    def scope(self, ref: api.ObjectReference) -> tuple[str, bool]:
        """(`resource.group`, namespaced) of the target's kind, from discovery."""
        resource = self._resource(ref)
        group = ref.group
        name = f"{resource.name}.{group}" if group else str(resource.name)
        return name, bool(resource.namespaced)

    def read_replicas(
        self,
        namespace: str | None,
        ref: api.ObjectReference,
        replicas_path: str | None,
        ready_path: str | None = None,
    ) -> Replicas:
        """The replica count, and the ready count at `ready_path` when given; `namespace` None
        for a cluster-scoped kind."""
        resource = self._resource(ref)
        try:
            obj = None
            if replicas_path or ready_path:
                obj = self._dynamic.get(resource, name=ref.name, namespace=namespace).to_dict()
            ready = None
            if obj is not None and ready_path:
                ready = _ready_count(obj, ready_path, "status" in resource.subresources)
            if replicas_path:
                assert obj is not None
                value = _pointer_int(obj, replicas_path)
                return Replicas(value, (obj.get("metadata") or {}).get("resourceVersion"), ready)
            scale = self._scale_subresource(resource, ref)
            obj = self._dynamic.get(scale, name=ref.name, namespace=namespace).to_dict()
            return Replicas(
                int((obj.get("spec") or {}).get("replicas") or 0),
                (obj.get("metadata") or {}).get("resourceVersion"),
                ready,
            )
        except NotFoundError:
            raise ScaleError(_not_found(namespace)) from None
        except ForbiddenError as exc:
            raise ScaleError(f"forbidden: {_reason(exc)}") from None
        except ApiException as exc:
            raise ScaleError(f"cannot read: {_reason(exc)}") from None

    def _scale_subresource(self, resource: Any, ref: api.ObjectReference) -> Any:
        scale = resource.subresources.get("scale")
        if scale is None:
            raise ScaleError(f"kind {ref.kind} has no scale subresource; set replicasPath")
        return scale

    def ensure_replicas(
        self,
        namespace: str | None,
        ref: api.ObjectReference,
        replicas_path: str | None,
        desired: int,
        known: Replicas | None = None,
    ) -> Change:
        """Patch the replica count to `desired`, and only if it differs (level-based, idempotent).

        The write is conditional on the version just read (`known`, when the caller read it), so
        it never overwrites a change it did not see (another writer, or a new leader).
        """
        for attempt in range(CONFLICT_RETRIES):
            if attempt:
                time.sleep(random.uniform(0, CONFLICT_BACKOFF_SECONDS * 2 ** (attempt - 1)))
            read = known or self.read_replicas(namespace, ref, replicas_path)
            known = None
            current = 0 if read.value is None else read.value
            if current == desired:
                return Change(current, desired)
            try:
                self._patch(namespace, ref, replicas_path, read, desired)
            except ConflictError:
                continue  # changed under us between read and write: read again
            except NotFoundError:
                raise ScaleError(_not_found(namespace)) from None
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
        namespace: str | None,
        ref: api.ObjectReference,
        replicas_path: str | None,
        read: Replicas,
        desired: int,
    ) -> None:
        resource = self._resource(ref)
        body: Any
        if replicas_path:
            # `test` makes the write conditional on what was read, like a resourceVersion would.
            target, content_type = resource, JSON_PATCH
            body = (
                [{"op": "add", "path": replicas_path, "value": desired}]
                if read.value is None
                else [
                    {"op": "test", "path": replicas_path, "value": read.value},
                    {"op": "replace", "path": replicas_path, "value": desired},
                ]
            )
        else:
            target, content_type = self._scale_subresource(resource, ref), MERGE_PATCH
            body = {"spec": {"replicas": desired}}
            if read.resource_version:
                body["metadata"] = {"resourceVersion": read.resource_version}
        self._guard()
        self._dynamic.patch(
            target,
            body=body,
            name=ref.name,
            namespace=namespace,
            content_type=content_type,
            field_manager=FIELD_MANAGER,
        )

    # -- the allocations

    def list_allocations(self, namespaces: Collection[str]) -> set[tuple[str, str, str]]:
        """(namespace, name, uid) of every allocation in `namespaces` (empty: all), now: their
        metadata only, in pages, so that a large fleet's specs do not cross the wire."""
        found: set[tuple[str, str, str]] = set()
        for namespace in namespaces or (None,):
            token: str | None = None
            while True:
                options: dict[str, Any] = {
                    "limit": LIST_PAGE,
                    "_headers": {"Accept": METADATA_ONLY},
                    "_request_timeout": LIST_TIMEOUT,
                }
                if token:
                    options["_continue"] = token
                page: Any = (
                    self._custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, **options)
                    if namespace is None
                    else self._custom.list_namespaced_custom_object(
                        GROUP, VERSION, namespace, PLURAL, **options
                    )
                )
                for item in page.get("items") or ():
                    meta = item["metadata"]
                    found.add((meta["namespace"], meta["name"], meta["uid"]))
                token = (page.get("metadata") or {}).get("continue")
                if not token:
                    break
        return found

    # -- the allocation's status and Events

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Merge-patch `status` (None deletes a field); StatusGone when the allocation is gone."""
        self._guard()
        try:
            self._custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                {"status": dict(status)},
                field_manager=FIELD_MANAGER,
                _content_type=MERGE_PATCH,
            )
        except ApiException as exc:
            if exc.status == 404:
                raise StatusGone(f"{namespace}/{name} is gone") from None
            raise

    def post_event(
        self,
        namespace: str,
        name: str,
        uid: str | None,
        type_: str,
        reason: str,
        message: str,
    ) -> None:
        now = datetime.now(UTC).isoformat()
        body = {
            "metadata": {"generateName": "melange-", "namespace": namespace},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": api.KIND,
                "name": name,
                "namespace": namespace,
                "uid": uid,
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.identity[:128],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        event = k8s.CoreV1Event.from_dict(body)
        assert event is not None
        self._guard()
        self._core.create_namespaced_event(namespace, event, field_manager=FIELD_MANAGER)

    # -- the routing table's ConfigMap

    def publish_routing(
        self, namespace: str, name: str, owner: Mapping[str, Any], key: str, text: str
    ) -> bool:
        """Create the ConfigMap `name` holding `text` at `key`, owned by `owner` (the allocation:
        apiVersion, kind, name, uid), or update one it already owns; True when something was
        written. One it does not own is left as it is (PublishError `ConfigMapConflict`)."""
        where = f"ConfigMap {namespace}/{name}"
        current = self._routing_config_map(namespace, name, where)
        if current is None:
            body = k8s.V1ConfigMap(
                metadata=k8s.V1ObjectMeta(
                    name=name,
                    namespace=namespace,
                    labels={
                        "app.kubernetes.io/managed-by": COMPONENT,
                        "melange.dev/allocation": str(owner["name"])[:63],
                    },
                    owner_references=[k8s.V1OwnerReference(**_owner_reference(owner))],
                ),
                data={key: text},
            )
            self._guard()
            try:
                self._core.create_namespaced_config_map(
                    namespace, body, field_manager=FIELD_MANAGER
                )
            except ApiException as exc:
                raise _publish_error(where, exc) from None
            return True
        if not _owned_by(current, owner["uid"]):
            raise PublishError(
                "ConfigMapConflict",
                f"{where} exists and is not owned by this allocation, so it was left as it is; "
                "delete or rename it",
            )
        if (current.data or {}).get(key) == text:
            return False
        current.data = {**(current.data or {}), key: text}
        self._guard()
        try:  # carries the resourceVersion read: a concurrent change fails instead of being lost
            self._core.replace_namespaced_config_map(
                name, namespace, current, field_manager=FIELD_MANAGER
            )
        except ApiException as exc:
            raise _publish_error(where, exc) from None
        return True

    def _routing_config_map(self, namespace: str, name: str, where: str) -> Any:
        """The ConfigMap as stored (a V1ConfigMap), None when there is none."""
        try:
            return self._core.read_namespaced_config_map(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _publish_error(where, exc) from None

    def unpublish_routing(self, namespace: str, name: str, owner_uid: str) -> None:
        """Delete the ConfigMap `name` if the allocation `owner_uid` owns it (gone is fine)."""
        where = f"ConfigMap {namespace}/{name}"
        current = self._routing_config_map(namespace, name, where)
        if current is None or not _owned_by(current, owner_uid):
            return
        current_uid = current.metadata.uid if current.metadata else None
        self._guard()
        try:
            self._core.delete_namespaced_config_map(
                name,
                namespace,
                body=k8s.V1DeleteOptions(preconditions=k8s.V1Preconditions(uid=current_uid)),
            )
        except ApiException as exc:
            if exc.status != 404:
                raise _publish_error(where, exc) from None

    # -- credentials the spec names, read fresh (tokens rotate)

    def price(self, namespace: str, ref: api.SecretKeyRef) -> str:
        """A price as its ConfigMap key holds it, from a ConfigMap labelled as a price source."""
        try:
            return self._read_key(
                "ConfigMap", namespace, ref, prices.PRICE_SOURCE_LABEL, "price sources"
            )
        except CredentialsUnavailable as exc:
            raise prices.PriceUnavailable(exc.message) from None

    def _read_key(
        self,
        kind: str,
        namespace: str,
        ref: api.SecretKeyRef,
        label: str = CREDENTIALS_LABEL,
        purpose: str = "rate sources",
    ) -> str:
        where = f"{kind} {namespace}/{ref.name}"
        read: k8s.V1Secret | k8s.V1ConfigMap
        try:
            if kind == "Secret":
                read = self._core.read_namespaced_secret(ref.name, namespace)
            else:
                read = self._core.read_namespaced_config_map(ref.name, namespace)
        except ApiException as exc:
            reason = {404: "not found", 403: "forbidden (RBAC)"}.get(exc.status or 0, exc.reason)
            raise CredentialsUnavailable(f"{where}: {reason}") from None
        labels = (read.metadata.labels if read.metadata is not None else None) or {}
        if labels.get(label) != "true":
            raise CredentialsUnavailable(
                f"{where} is not labelled {label}=true, so its owner has not let {purpose} use "
                f"it; {'nothing was sent' if label == CREDENTIALS_LABEL else 'it was not read'}"
            )
        data: Mapping[str, Any] = read.data or {}
        if ref.key not in data:
            raise CredentialsUnavailable(f"{where} has no key {ref.key!r}")
        value = data[ref.key]
        try:
            if kind == "Secret" and isinstance(value, str):  # the API's base64 form
                value = base64.b64decode(value, validate=True)
            text = value.decode() if isinstance(value, bytes) else str(value)
        except (binascii.Error, UnicodeDecodeError):
            raise CredentialsUnavailable(f"{where}: key {ref.key!r} is not text") from None
        return text.strip()

    def credentials(
        self, namespace: str, source: api.PrometheusSource
    ) -> tuple[str | None, str | None]:
        """The bearer token and the CA bundle the spec names, from a Secret and a ConfigMap
        labelled `CREDENTIALS_LABEL=true`."""
        token = ca = None
        if source.bearer_token_secret_ref is not None:
            token = self._read_key("Secret", namespace, source.bearer_token_secret_ref)
        if source.ca_config_map_ref is not None:
            ca = self._read_key("ConfigMap", namespace, source.ca_config_map_ref)
        return token, ca

    # -- the leader Lease (never guarded: it is how leadership is won)

    def read_lease(self, namespace: str, name: str) -> LeaseRecord | None:
        try:
            lease = self._coordination.read_namespaced_lease(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        spec = lease.spec
        renew = spec.renew_time if spec is not None else None
        return LeaseRecord(
            holder=spec.holder_identity if spec is not None else None,
            renew_time=renew.isoformat() if renew is not None else None,
            duration_seconds=spec.lease_duration_seconds if spec is not None else None,
            transitions=(spec.lease_transitions or 0) if spec is not None else 0,
            acquire_time=spec.acquire_time if spec is not None else None,
            resource_version=lease.metadata.resource_version if lease.metadata else None,
        )

    def write_lease(
        self,
        namespace: str,
        name: str,
        holder: str | None,
        duration_seconds: int,
        transitions: int,
        acquire_time: datetime | None,
        resource_version: str | None,
    ) -> bool:
        """Create or replace the Lease (conditional on `resource_version`); False on a conflict."""
        now = datetime.now(UTC)
        spec = k8s.V1LeaseSpec(
            holder_identity=holder,
            lease_duration_seconds=duration_seconds,
            renew_time=now,
            lease_transitions=transitions,
            acquire_time=acquire_time or now,
        )
        body = k8s.V1Lease(
            metadata=k8s.V1ObjectMeta(
                name=name, namespace=namespace, resource_version=resource_version
            ),
            spec=spec,
        )
        try:
            if resource_version is None:
                self._coordination.create_namespaced_lease(
                    namespace, body, field_manager=FIELD_MANAGER
                )
            else:
                self._coordination.replace_namespaced_lease(
                    name, namespace, body, field_manager=FIELD_MANAGER
                )
        except ApiException as exc:
            if exc.status in (409, 422):
                return False
            raise
        return True
