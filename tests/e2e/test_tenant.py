"""What an allocation's author can make the operator do with a rate source: the real API server, the
operator as a process, a real Prometheus, and a recording HTTP listener on loopback standing for a
server the author controls or a page inside the cluster. The author is a tenant: a ServiceAccount
whose Role allows it only to manage MelangeAllocations in its namespace, not to read its Secrets.

- A Secret is sent only when its owner labelled it for rate sources, and only to a URL the
  operator's administrator allows (by default, with a token, only to in-cluster Services).
- A url that could move the query endpoint (a fragment, a query) is refused by the API server.
- No status or Event carries any of the body of an answer that is not Prometheus'.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.dynamic.exceptions import UnprocessibleEntityError

from tests.controlplane.harness import ControlPlane

from .kube import Kinds, Kube
from .operator_process import OperatorProcess
from .prometheus import PrometheusServer
from .test_operator import make_pools
from .test_rates import CREDENTIALS, INTERVAL, rate_manifest, wait_observed

pytestmark = pytest.mark.e2e

MARKER = "internal-only-" + uuid.uuid4().hex
TENANT = "tenant"


class Listener:
    """An HTTP server on loopback that records every request and answers every path with a page
    holding `MARKER`: `/json/...` with JSON that is not Prometheus', `/error/...` with HTTP 500,
    any other path with HTML."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        lock = threading.Lock()
        recorded = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with lock:
                    recorded.append((self.path, dict(self.headers.items())))
                if self.path.startswith("/json/"):
                    status, kind = 200, "application/json"
                    body = json.dumps({"status": "success", "data": {"resultType": MARKER}})
                elif self.path.startswith("/error/"):
                    status, kind, body = 500, "text/plain", f"panic: {MARKER}\n"
                else:
                    status, kind = 200, "text/html; charset=utf-8"
                    body = f"<html><body><h1>Admin</h1><p>{MARKER}</p></body></html>"
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def carrying(self, value: str) -> list[str]:
        """The paths of requests with `value` in any header."""
        return [
            path for path, headers in self.requests if any(value in v for v in headers.values())
        ]


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    try:
        yield server
    finally:
        server.stop()


def tenant_role(namespace: str) -> dict[str, Any]:
    """All a tenant may do: manage MelangeAllocations in its own namespace (no Secrets, no
    status subresource, nothing else)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": TENANT, "namespace": namespace},
        "rules": [
            {
                "apiGroups": ["melange.dev"],
                "resources": ["melangeallocations"],
                "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
            }
        ],
    }


@pytest.fixture
def tenant(control_plane: ControlPlane, kube: Kube, namespace: str) -> Kube:
    """A client for the ServiceAccount `tenant` in the test namespace, bound to `tenant_role`."""
    kubeconfig = control_plane.service_account_kubeconfig(namespace, TENANT)
    kube.apply(tenant_role(namespace), namespace)
    kube.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": TENANT, "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": TENANT},
            "subjects": [{"kind": "ServiceAccount", "name": TENANT, "namespace": namespace}],
        },
        namespace,
    )
    return Kube(kubeconfig)


def can_i(
    kube: Kube, verb: str, resource: str, namespace: str, group: str = "", name: str = ""
) -> bool:
    """`kubectl auth can-i VERB RESOURCE[/NAME] -n NAMESPACE`, asked by `kube`'s own identity
    (a SelfSubjectAccessReview)."""
    review = client.AuthorizationV1Api(kube.api_client).create_self_subject_access_review(
        client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(
                resource_attributes=client.V1ResourceAttributes(
                    verb=verb,
                    group=group,
                    resource=resource,
                    name=name or None,
                    namespace=namespace,
                )
            )
        )
    )
    assert review.status is not None
    return bool(review.status.allowed)


def start_operator(
    control_plane: ControlPlane, namespace: str, tmp_path: Path, identity: str, *allowed: str
) -> OperatorProcess:
    args = [arg for url in allowed for arg in ("--allow-prometheus-url", url)]
    process = OperatorProcess(
        control_plane,
        namespace,
        tmp_path,
        identity=identity,
        extra_args=("--resync-seconds", "1", *args),
    )
    process.start()
    return process


def stop_operator(process: OperatorProcess) -> None:
    process.stop()
    print(f"--- operator {process.identity} log (tail) ---\n{process.log()[-6000:]}")


def secret(name: str, value: str, labels: dict[str, str] | None = None) -> client.V1Secret:
    return client.V1Secret(
        metadata=client.V1ObjectMeta(name=name, labels=labels), string_data={"password": value}
    )


def with_token(url: str, secret_name: str) -> dict[str, Any]:
    manifest = rate_manifest("chat", url)
    manifest["spec"]["rateSource"]["prometheus"]["bearerTokenSecretRef"] = {
        "name": secret_name,
        "key": "password",
    }
    return manifest


def test_a_secret_goes_only_where_its_owner_and_the_administrator_allow(
    control_plane: ControlPlane,
    kube: Kube,
    namespace: str,
    tenant: Kube,
    listener: Listener,
    prometheus: PrometheusServer,
    tmp_path: Path,
) -> None:
    password = "db-" + uuid.uuid4().hex
    core = client.CoreV1Api(kube.api_client)
    core.create_namespaced_secret(namespace, secret("db-password", password))
    make_pools(kube, namespace, replicas=0)

    # The tenant cannot read the Secret itself, but can write allocations.
    assert not can_i(tenant, "get", "secrets", namespace, name="db-password")
    assert can_i(tenant, "create", "melangeallocations", namespace, group="melange.dev")
    with pytest.raises(client.exceptions.ApiException) as refused:
        client.CoreV1Api(tenant.api_client).read_namespaced_secret("db-password", namespace)
    assert refused.value.status == 403

    # The tenant asks the operator to send the Secret, as a bearer token, to its own server.
    tenant.create(with_token(listener.url, "db-password"), namespace)

    # The default: a token goes to an in-cluster Service only; the listener hears nothing.
    operator = start_operator(control_plane, namespace, tmp_path, "default")
    try:
        condition = wait_observed(kube, "chat", namespace, "False", "URLNotAllowed")
        assert condition["message"].startswith(
            f"{listener.url} is not an in-cluster Service (a host ending in .svc or "
            ".svc.cluster.local), and the operator sends a bearer token only to one unless its "
            "administrator allows the URL (--allow-prometheus-url); nothing was sent"
        )
    finally:
        stop_operator(operator)
    assert listener.requests == []

    # The URL allowed, but the Secret's owner has not labelled it: still nothing is sent.
    operator = start_operator(
        control_plane, namespace, tmp_path, "allowed", listener.url, prometheus.url
    )
    try:
        condition = wait_observed(kube, "chat", namespace, "False", "CredentialsUnavailable")
        assert condition["message"].startswith(
            f"Secret {namespace}/db-password is not labelled {CREDENTIALS}=true, so its owner has "
            "not let rate sources use it; nothing was sent"
        )
        time.sleep(2 * INTERVAL)  # two more rounds
        assert listener.requests == []

        # Any other URL is refused once there is an allow-list, with or without a token.
        other = prometheus.url.replace("127.0.0.1", "localhost")
        tenant.merge_patch(
            Kinds.allocation,
            "chat",
            namespace,
            {"spec": {"rateSource": {"prometheus": {"url": other, "bearerTokenSecretRef": None}}}},
        )
        condition = wait_observed(
            kube, "chat", namespace, "False", "URLNotAllowed", message=f"{other} is not under"
        )
        assert "--allow-prometheus-url" in condition["message"]

        # Labelled by its owner and sent to an allowed Prometheus: the rate is read.
        core.patch_namespaced_secret(
            "db-password", namespace, {"metadata": {"labels": {CREDENTIALS: "true"}}}
        )
        tenant.merge_patch(
            Kinds.allocation,
            "chat",
            namespace,
            {
                "spec": {
                    "rateSource": {
                        "prometheus": {
                            "url": prometheus.url,
                            "bearerTokenSecretRef": {"name": "db-password", "key": "password"},
                        }
                    }
                }
            },
        )
        wait_observed(kube, "chat", namespace, "True", "Observed")
    finally:
        stop_operator(operator)
    assert listener.carrying(password) == []


@pytest.mark.parametrize("suffix", ["#", "?x=", "/internal/admin#", "/internal/admin?x=1&y="])
def test_a_url_that_moves_the_query_endpoint_is_refused_by_the_api_server(
    kube: Kube, namespace: str, listener: Listener, suffix: str
) -> None:
    with pytest.raises(UnprocessibleEntityError) as info:
        kube.create(rate_manifest("chat", listener.url + suffix), namespace)
    message = str(json.loads(str(info.value.body))["message"])
    assert "spec.rateSource.prometheus.url" in message
    with pytest.raises(UnprocessibleEntityError):
        kube.create(rate_manifest("chat", "http://user:pw@" + listener.url[7:]), namespace)
    assert listener.requests == []


def test_no_status_or_event_quotes_an_answer_that_is_not_prometheus(
    kube: Kube, namespace: str, operator: OperatorProcess, listener: Listener
) -> None:
    make_pools(kube, namespace, replicas=0)
    kube.create(rate_manifest("chat", f"{listener.url}/internal/admin"), namespace)
    condition = wait_observed(kube, "chat", namespace, "False", "InvalidResponse")
    assert condition["message"].startswith(
        f"the answer from {listener.url}/internal/admin/api/v1/query is not Prometheus API JSON "
        "(HTTP 200, text/html, "
    )
    assert any(path.startswith("/internal/admin/api/v1/query?") for path, _ in listener.requests)

    for url, reason, text in [
        (f"{listener.url}/json", "QueryFailed", "the query returned an unknown result type"),
        (f"{listener.url}/error", "PrometheusUnavailable", "(HTTP 500, text/plain, "),
    ]:
        kube.merge_patch(
            Kinds.allocation,
            "chat",
            namespace,
            {"spec": {"rateSource": {"prometheus": {"url": url}}}},
        )
        wait_observed(kube, "chat", namespace, "False", reason, message=text)

    stored = json.dumps(kube.allocation("chat", namespace))
    events = json.dumps(kube.events(namespace), default=str)
    assert "RateObserved" in stored
    assert "api/v1/query" in events  # the Events were posted, and name the URL
    assert MARKER not in stored
    assert MARKER not in events
    assert MARKER not in operator.log()
