"""A small test client for the real control plane: objects, replicas, Events, and waiting."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client, config
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError

T = TypeVar("T")
MANIFESTS = Path(__file__).with_name("manifests")
REPO = Path(__file__).parents[2]
CRD_FILE = REPO / "crds" / "melangeallocations.melange.dev.yaml"


def eventually(probe: Callable[[], T], timeout: float = 60.0, interval: float = 0.2) -> T:
    """Poll `probe` until it returns without an AssertionError; a deadline, not a performance goal."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return probe()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(interval)


@dataclass(frozen=True)
class Kinds:
    allocation = ("melange.dev/v1alpha1", "MelangeAllocation")
    deployment = ("apps/v1", "Deployment")
    machine_deployment = ("cluster.x-k8s.io/v1beta1", "MachineDeployment")
    node_pool = ("test.melange.dev/v1", "NodePool")


class Kube:
    def __init__(self, kubeconfig: Path) -> None:
        self.api_client = config.new_client_from_config(config_file=str(kubeconfig))
        self.dynamic = DynamicClient(self.api_client)

    def resource(self, kind: tuple[str, str]) -> Any:
        try:
            return self.dynamic.resources.get(api_version=kind[0], kind=kind[1])
        except Exception:
            self.dynamic.resources.invalidate_cache()
            return self.dynamic.resources.get(api_version=kind[0], kind=kind[1])

    # -- objects -------------------------------------------------------------------------------

    def apply_file(self, path: Path) -> list[dict[str, Any]]:
        """Create (or replace) every document of a YAML file, cluster-scoped or namespaced."""
        return [self.apply(doc) for doc in yaml.safe_load_all(path.read_text()) if doc]

    def apply(self, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        resource = self.resource((body["apiVersion"], body["kind"]))
        name = body["metadata"]["name"]
        try:
            existing = self.dynamic.get(resource, name=name, namespace=namespace)
        except NotFoundError:
            created = self.dynamic.create(resource, body=body, namespace=namespace)
            return dict(created.to_dict())
        body = {
            **body,
            "metadata": {**body["metadata"], "resourceVersion": existing.metadata.resourceVersion},
        }
        replaced = self.dynamic.replace(resource, body=body, namespace=namespace)
        return dict(replaced.to_dict())

    def create(self, body: dict[str, Any], namespace: str) -> dict[str, Any]:
        resource = self.resource((body["apiVersion"], body["kind"]))
        created = self.dynamic.create(resource, body=body, namespace=namespace)
        return dict(created.to_dict())

    def get(self, kind: tuple[str, str], name: str, namespace: str) -> dict[str, Any]:
        obj = self.dynamic.get(self.resource(kind), name=name, namespace=namespace)
        return dict(obj.to_dict())

    def merge_patch(
        self, kind: tuple[str, str], name: str, namespace: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        obj = self.dynamic.patch(
            self.resource(kind),
            body=body,
            name=name,
            namespace=namespace,
            content_type="application/merge-patch+json",
        )
        return dict(obj.to_dict())

    def set_ready(self, kind: tuple[str, str], name: str, namespace: str, ready: int) -> None:
        """Set `status.readyReplicas` through the status subresource, as the pool's own
        controller would once its nodes join (no such controller runs on the test control plane)."""
        self.dynamic.patch(
            self.resource(kind).subresources["status"],
            body={"status": {"readyReplicas": ready}},
            name=name,
            namespace=namespace,
            content_type="application/merge-patch+json",
        )

    def delete(self, kind: tuple[str, str], name: str, namespace: str) -> None:
        self.dynamic.delete(self.resource(kind), name=name, namespace=namespace)

    def create_namespace(self, name: str) -> None:
        client.CoreV1Api(self.api_client).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
        )

    def wait_established(self, crd_name: str) -> None:
        kind = ("apiextensions.k8s.io/v1", "CustomResourceDefinition")

        def established() -> None:
            crd = self.dynamic.get(self.resource(kind), name=crd_name)
            conditions = {
                c["type"]: c["status"]
                for c in (crd.to_dict().get("status") or {}).get("conditions") or []
            }
            assert conditions.get("Established") == "True", conditions

        eventually(established, timeout=30)
        self.dynamic.resources.invalidate_cache()

    # -- node pools ----------------------------------------------------------------------------

    def deployment(self, name: str, namespace: str, replicas: int = 0) -> dict[str, Any]:
        labels = {"app": name}
        return self.create(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": name},
                "spec": {
                    "replicas": replicas,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0"}]},
                    },
                },
            },
            namespace,
        )

    def machine_deployment(self, name: str, namespace: str, replicas: int = 0) -> dict[str, Any]:
        return self.create(
            {
                "apiVersion": "cluster.x-k8s.io/v1beta1",
                "kind": "MachineDeployment",
                "metadata": {"name": name},
                "spec": {"replicas": replicas, "clusterName": "serving"},
            },
            namespace,
        )

    def node_pool(self, name: str, namespace: str, size: int = 0) -> dict[str, Any]:
        return self.create(
            {
                "apiVersion": "test.melange.dev/v1",
                "kind": "NodePool",
                "metadata": {"name": name},
                "spec": {"size": size, "machineType": "g6.xlarge"},
            },
            namespace,
        )

    def replicas(self, kind: tuple[str, str], name: str, namespace: str) -> int | None:
        spec = self.get(kind, name, namespace).get("spec") or {}
        value = spec.get("size" if kind == Kinds.node_pool else "replicas")
        return None if value is None else int(value)

    def resource_version(self, kind: tuple[str, str], name: str, namespace: str) -> str:
        return str(self.get(kind, name, namespace)["metadata"]["resourceVersion"])

    def lease(self, name: str, namespace: str) -> dict[str, Any] | None:
        """The Lease's spec (holderIdentity, acquireTime, ...), or None when there is none."""
        try:
            lease = client.CoordinationV1Api(self.api_client).read_namespaced_lease(name, namespace)
        except client.exceptions.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(lease.spec.to_dict()) if lease.spec is not None else {}

    # -- allocations ---------------------------------------------------------------------------

    def allocation(self, name: str, namespace: str) -> dict[str, Any]:
        return self.get(Kinds.allocation, name, namespace)

    def condition(self, name: str, namespace: str, type_: str) -> dict[str, Any] | None:
        status = self.allocation(name, namespace).get("status") or {}
        for condition in status.get("conditions") or []:
            if condition["type"] == type_:
                return dict(condition)
        return None

    def wait_condition(
        self,
        name: str,
        namespace: str,
        type_: str,
        status: str = "True",
        reason: str | None = None,
        message: str = "",
        timeout: float = 60,
    ) -> dict[str, Any]:
        """Poll until the allocation's condition has that status (and reason, and message part)."""

        def reached() -> dict[str, Any]:
            condition = self.condition(name, namespace, type_)
            assert condition is not None
            assert condition["status"] == status, condition
            if reason:
                assert condition["reason"] == reason, condition
            assert message in condition["message"], condition
            return condition

        return eventually(reached, timeout=timeout)

    def events(self, namespace: str, involved: str | None = None) -> list[dict[str, Any]]:
        items = client.CoreV1Api(self.api_client).list_namespaced_event(namespace).items
        result = [e.to_dict() for e in items]
        if involved is not None:
            result = [e for e in result if e["involved_object"]["name"] == involved]
        return result

    def wait_events(
        self, namespace: str, involved: str, *wanted: str, timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        """The Events of `involved` once one of each `wanted` reason is there. The operator posts
        a reconcile's Events after its status and its pools, so a test that waited for those
        waits for the Events too."""

        def posted() -> list[dict[str, Any]]:
            events = self.events(namespace, involved)
            missing = set(wanted) - set(reasons(events))
            assert not missing, f"no {sorted(missing)} Event for {namespace}/{involved} yet"
            return events

        return eventually(posted, timeout=timeout)

    def table(self, namespace: str) -> dict[str, Any]:
        """What `kubectl get mla` shows: the server-side Table with the CRD's printer columns."""
        response = self.dynamic.request(
            "get",
            f"/apis/melange.dev/v1alpha1/namespaces/{namespace}/melangeallocations",
            header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
        )
        return dict(response.to_dict())


def reasons(events: Iterable[dict[str, Any]]) -> list[str]:
    return [str(e["reason"]) for e in events]
