"""Kubernetes for `melange route`: the routing table from a ConfigMap, and each GPU type's servers
from its Service's EndpointSlices, both watched (docs/routing.md#melange-route).

The one module of `melange.route` that talks to Kubernetes (the import-linter contract names it
beside `melange.controller.kube`): the router runs where the operator publishes its tables and
where the engines' pods come and go, and watching both is how it follows them without a restart.
The kubernetes client blocks, so each watch runs in a thread of its own and hands what it reads
to the router's event loop through a `proxy.Sink`; `proxy` itself knows nothing of Kubernetes.

Each watch lists, then watches from the list's resourceVersion for a few minutes, then lists
again (so a missed event, a 410 Gone or an API server restart heals by itself); an error is
logged and retried with a growing delay.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from kubernetes import client, config, watch

from melange.plan import routing as route

if TYPE_CHECKING:
    from melange.route.proxy import Sink

log = logging.getLogger("melange.route.kube")

NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # set on a Service's EndpointSlices
WATCH_SECONDS = 240  # each watch ends after this long and the objects are listed again
REQUEST_SECONDS = 30.0
RETRY_SECONDS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


def own_namespace(path: str = NAMESPACE_FILE) -> str:
    """The pod's namespace (its service account's), else "default"."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().strip() or "default"
    except OSError:
        return "default"


def connect() -> Any:
    """A client: the pod's service account in a cluster, else KUBECONFIG (or ~/.kube/config).
    Raises ValueError when there is neither."""
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(TOKEN_FILE):
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            return client.ApiClient(configuration)
        return config.new_client_from_config()  # type: ignore[no-untyped-call]
    except (config.ConfigException, OSError) as exc:
        raise ValueError(f"no Kubernetes configuration (in-cluster or KUBECONFIG): {exc}") from None


def parse_configmap(value: str, default_namespace: str) -> tuple[str, str]:
    """`[NAMESPACE/]NAME` -> (namespace, name); raises ValueError."""
    namespace, _, name = value.rpartition("/")
    if not name or "/" in namespace:
        raise ValueError(f"must be [NAMESPACE/]NAME, got {value!r}")
    return namespace or default_namespace, name


class _Watch(threading.Thread, abc.ABC):
    """List, then watch, then list again; `listed` gets every object, `changed` each event."""

    def __init__(self, what: str, lister: Callable[..., Any], **selector: str) -> None:
        super().__init__(name=f"watch {what}", daemon=True)
        self.what = what
        self.lister = lister
        self.selector = selector
        self.stopped = threading.Event()
        self._watch: watch.Watch | None = None
        self._last_error = ""

    def stop(self) -> None:
        self.stopped.set()
        if self._watch is not None:
            self._watch.stop()  # type: ignore[no-untyped-call]  # at its next event, or its timeout

    @abc.abstractmethod
    def listed(self, items: list[Any]) -> None:
        """Every object, as a fresh list shows them."""

    @abc.abstractmethod
    def changed(self, kind: str, obj: Any) -> None:
        """One watch event (ADDED, MODIFIED, DELETED) and its object."""

    def run(self) -> None:
        failures = 0
        while not self.stopped.is_set():
            try:
                listing = self.lister(**self.selector, _request_timeout=REQUEST_SECONDS)
                if self.stopped.is_set():
                    return
                self.listed(list(listing.items or ()))
                self._watch = watch.Watch()  # type: ignore[no-untyped-call]
                for event in self._watch.stream(  # type: ignore[no-untyped-call]
                    self.lister,
                    resource_version=listing.metadata.resource_version,
                    timeout_seconds=WATCH_SECONDS,
                    allow_watch_bookmarks=True,
                    _request_timeout=WATCH_SECONDS + REQUEST_SECONDS,
                    **self.selector,
                ):
                    if self.stopped.is_set():
                        return
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self.changed(event["type"], event["object"])
                failures, self._last_error = 0, ""
            except client.ApiException as exc:
                if exc.status == 410:  # the version listed is gone: list again at once
                    continue
                failures = self._failed(f"{exc.status} {exc.reason}", failures)
            except Exception as exc:  # the API server is away, or answers nonsense: retry
                failures = self._failed(f"{type(exc).__name__}: {exc}", failures)

    def _failed(self, message: str, failures: int) -> int:
        if self.stopped.is_set():  # e.g. the client's connections closed as the process exits
            return failures
        if message != self._last_error:  # a lasting error is logged once, not every retry
            log.warning("watching %s: %s (retrying)", self.what, message)
            self._last_error = message
        self.stopped.wait(RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)])
        return failures + 1


class _ConfigMapWatch(_Watch):
    """The table in one key of a ConfigMap. A deleted ConfigMap (or one not made yet) keeps the
    table in use; the same text again is not a new table."""

    def __init__(self, core: Any, namespace: str, name: str, key: str, sink: Sink) -> None:
        super().__init__(
            f"ConfigMap {namespace}/{name}",
            core.list_namespaced_config_map,
            namespace=namespace,
            field_selector=f"metadata.name={name}",
        )
        self.key, self.sink = key, sink
        self.text: str | None = None
        self.read = False  # whether `text` was read (None: the key was missing)
        self.present: bool | None = None

    def listed(self, items: list[Any]) -> None:
        if items:
            self.changed("ADDED", items[0])
        else:
            self._absent()

    def _absent(self) -> None:
        if self.present is not False:
            log.warning(
                "%s %s%s",
                self.what,
                "was deleted" if self.present else "does not exist (yet)",
                ": the routing table in use stays" if self.read else "",
            )
        self.present = False

    def changed(self, kind: str, obj: Any) -> None:
        if kind == "DELETED":
            self._absent()
            return
        self.present = True
        text = (obj.data or {}).get(self.key)
        if self.read and text == self.text:
            return
        self.text, self.read = text, True
        source = f"{self.what} key {self.key}"
        if text is None:
            self.sink.table_error(f"{source}: no such key")
            return
        try:
            table = route.from_dict(json.loads(text))
        except ValueError as exc:  # JSONDecodeError is one
            self.sink.table_error(f"{source}: {exc}")
            return
        self.sink.table(table, source)


class _ServiceWatch(_Watch):
    """The ready servers of one GPU type's Service, from its EndpointSlices.

    The port: `upstream.port` names a port of the Service (its number or its name); an
    EndpointSlice lists the target ports under the Service ports' names, so a number is turned
    into its name by reading the Service (again at each list), and the slices' port of that name
    is the servers' port ("" for a Service with one unnamed port)."""

    def __init__(
        self,
        core: Any,
        discovery: Any,
        gpu: str,
        upstream: route.Upstream,
        namespace: str,
        sink: Sink,
    ) -> None:
        super().__init__(
            f"Service {namespace}/{upstream.service} ({gpu})",
            discovery.list_namespaced_endpoint_slice,
            namespace=namespace,
            label_selector=f"{SERVICE_NAME_LABEL}={upstream.service}",
        )
        self.core, self.gpu, self.upstream, self.namespace, self.sink = (
            core,
            gpu,
            upstream,
            namespace,
            sink,
        )
        self.slices: dict[str, Any] = {}
        self.port_name: str | None = None
        self.urls: list[str] | None = None

    def _resolve_port(self) -> None:
        port = self.upstream.port
        if isinstance(port, str):
            self.port_name = port
            return
        try:
            service = self.core.read_namespaced_service(
                self.upstream.service, self.namespace, _request_timeout=REQUEST_SECONDS
            )
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            if self.port_name is not None or self.urls is None:
                log.warning("%s: not found; no servers until it exists", self.what)
            self.port_name = None
            return
        names = [p.name or "" for p in service.spec.ports or () if p.port == port]
        if not names:
            log.warning("%s has no port %s; no servers until it has", self.what, port)
        self.port_name = names[0] if names else None

    def listed(self, items: list[Any]) -> None:
        self._resolve_port()
        self.slices = {s.metadata.name: s for s in items}
        self._report()

    def changed(self, kind: str, obj: Any) -> None:
        if kind == "DELETED":
            self.slices.pop(obj.metadata.name, None)
        else:
            self.slices[obj.metadata.name] = obj
        if self.port_name is None:
            self._resolve_port()
        self._report()

    def _report(self) -> None:
        urls = sorted(set(ready_urls(self.slices.values(), self.port_name)))
        if urls != self.urls and not self.stopped.is_set():
            self.urls = urls
            self.sink.endpoints(self.gpu, self.upstream, urls)


def ready_urls(slices: Iterable[Any], port_name: str | None) -> list[str]:
    """`http://address:port` of every ready endpoint of `slices`, at their port named
    `port_name` (absent `ready` counts as ready, as the API documents; an endpoint's first
    address is the one to use)."""
    if port_name is None:
        return []
    urls = []
    for piece in slices:
        ports = [p.port for p in piece.ports or () if (p.name or "") == port_name and p.port]
        if not ports:
            continue
        for endpoint in piece.endpoints or ():
            conditions = endpoint.conditions
            if conditions is not None and conditions.ready is False:
                continue
            if not endpoint.addresses:
                continue
            address = endpoint.addresses[0]
            host = f"[{address}]" if piece.address_type == "IPv6" else address
            urls.append(f"http://{host}:{ports[0]}")
    return urls


class KubeFeed:
    """`proxy.Feed` from the Kubernetes API: the table from a ConfigMap (when given one), and the
    servers of the types whose table names a Service. Connects when first needed."""

    def __init__(
        self,
        configmap: tuple[str, str] | None = None,
        key: str = "table.json",
        namespace: str = "default",
        api_client: Any = None,
    ) -> None:
        self.configmap, self.key, self.namespace = configmap, key, namespace
        self.api_client = api_client
        self.sink: Sink | None = None
        self._lock = threading.Lock()
        self._table_watch: _ConfigMapWatch | None = None
        self._watches: dict[tuple[str, route.Upstream], _ServiceWatch] = {}
        self._unreachable = False

    def _client(self) -> Any:
        if self.api_client is None:
            self.api_client = connect()
        return self.api_client

    def start(self, sink: Sink) -> None:
        self.sink = sink
        if self.configmap is not None:
            namespace, name = self.configmap
            core = client.CoreV1Api(self._client())
            self._table_watch = _ConfigMapWatch(core, namespace, name, self.key, sink)
            self._table_watch.start()

    def want(self, upstreams: Mapping[str, route.Upstream]) -> None:
        assert self.sink is not None, "start() first"
        wanted = set(upstreams.items())
        with self._lock:
            for key in [k for k in self._watches if k not in wanted]:
                self._watches.pop(key).stop()
            new = [k for k in wanted if k not in self._watches]
            if not new:
                return
            try:
                api = self._client()
            except ValueError as exc:
                if not self._unreachable:
                    log.error("the table names Services for %s, but %s", sorted(upstreams), exc)
                    self._unreachable = True
                return
            core, discovery = client.CoreV1Api(api), client.DiscoveryV1Api(api)
            for gpu, upstream in sorted(new, key=lambda k: k[0]):
                namespace = upstream.namespace or self.namespace
                started = _ServiceWatch(core, discovery, gpu, upstream, namespace, self.sink)
                self._watches[gpu, upstream] = started
                started.start()

    def stop(self) -> None:
        with self._lock:
            for started in self._watches.values():
                started.stop()
            self._watches.clear()
            if self._table_watch is not None:
                self._table_watch.stop()
                self._table_watch = None
