"""`melange route` following Kubernetes: the table from a ConfigMap, the servers from EndpointSlices.

Against the real kube-apiserver the harness starts (tests/controlplane). No kubelet or controller
runs there, so no pod ever exists and no EndpointSlice controller fills a Service's slices: the
test writes the EndpointSlices itself, as that controller would, pointing at gpusim servers on
this machine (one slice per server, since each listens on its own port). The API refuses
loopback addresses in an EndpointSlice, so the servers listen on the machine's own non-loopback
address, not on 127.0.0.1. The router runs as a
ServiceAccount with exactly the RBAC the chart grants it (configmaps get/list/watch in the
table's namespace; services get and endpointslices list/watch in the engines' namespace), so a
call it needs beyond that fails the test.

Checked: a table published after the router started is picked up (readiness follows), a changed
table routes by its new shares without a restart (per-type counts of a trace within sampling
error), a bad table and a deleted ConfigMap keep the one in use, each type's servers come from its
Service's ready endpoints (a port by number, then by name, and a single unnamed port by number),
and an endpoint
marked not ready stops getting requests (all of a type's: the type spills, and with no type left
/readyz fails).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.controlplane.harness import ControlPlane

from .kube import Kube, eventually
from .operator_process import terminate
from .prometheus import REPO, _get, _wait, free_port
from .test_profile import MODEL
from .test_route import FAST, Router, launch_router, send, table

pytestmark = pytest.mark.e2e

ACCOUNT = "melange-route"
CONFIGMAP = "mixed-routing"
N = 240  # requests per trace: a share of 0.8 is measured within 4 sigma = 0.10


@dataclass
class Simulator:
    """A gpusim server (tests/e2e/gpusim.py) on a non-loopback address."""

    host: str
    port: int
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def requests(self) -> list[dict[str, Any]]:
        text = self.log_path.read_text() if self.log_path.exists() else ""
        return [json.loads(line) for line in text.splitlines()]


# gpusim's own command line, listening on the address given first instead of 127.0.0.1
SERVE = """
import sys
from aiohttp import web
from tests.e2e import gpusim
host, run_app = sys.argv[1], web.run_app
web.run_app = lambda app, **options: run_app(app, **{**options, "host": host})
gpusim.main(sys.argv[2:])
"""


def own_address() -> str:
    """This machine's address on its default route (no packet is sent). The API server refuses
    loopback addresses in an EndpointSlice (and FQDN ones need a dotted name that resolves), so
    the servers listen on it. Without one the test cannot run: a skip elsewhere, a failure in CI
    (where a skip must not pass for a run)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            address = str(probe.getsockname()[0])
        except OSError:
            address = ""
    if not address or address.startswith("127.") or address == "0.0.0.0":
        message = "no non-loopback IPv4 address to put in an EndpointSlice"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return address


def start_sim(workdir: Path, host: str) -> Simulator:
    port = free_port()
    log_path = workdir / f"gpusim-{port}.jsonl"
    with (workdir / f"gpusim-{port}.out").open("ab") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SERVE,
                host,
                f"--port={port}",
                f"--model={MODEL}",
                f"--log={log_path}",
                *FAST,
            ],
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    sim = Simulator(host, port, log_path, process)
    _wait(lambda: process.poll() is None and _get(f"{sim.url}/v1/models")[0] == 200, "gpusim")
    return sim


def upstreams(serving: str, port_a: int | str) -> dict[str, dict[str, Any]]:
    return {
        "A": {"namespace": serving, "service": "sim-a", "port": port_a},
        "B": {"namespace": serving, "service": "sim-b", "port": 80},
    }


def document(shares: Sequence[float], serving: str, port_a: int | str = "http") -> str:
    """A table whose every input bucket sends `shares` of its requests to A and B; A's Service
    port named by `port_a` (8000 or "http": the same port)."""
    return json.dumps({**table([list(shares)] * 3), "upstreams": upstreams(serving, port_a)})


def slice_body(name: str, service: str, sim: Simulator, port_name: str | None) -> Any:
    """An EndpointSlice of one ready server, as the Service's controller writes them (a dict:
    the client takes one where its signature says a model)."""
    port = sim.port
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [sim.host], "conditions": {"ready": True}}],
        "ports": [{**({"name": port_name} if port_name else {}), "port": port, "protocol": "TCP"}],
    }


def service_body(name: str, port: dict[str, Any]) -> Any:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"ports": [{"protocol": "TCP", **port}]},
    }


def grant(kube: Kube, table_namespace: str, serving: str) -> None:
    """The router's RBAC, as the chart grants it."""
    rbac = client.RbacAuthorizationV1Api(kube.api_client)
    subject = {"kind": "ServiceAccount", "name": ACCOUNT, "namespace": table_namespace}
    rules = {
        table_namespace: [
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]}
        ],
        serving: [
            {"apiGroups": [""], "resources": ["services"], "verbs": ["get"]},
            {
                "apiGroups": ["discovery.k8s.io"],
                "resources": ["endpointslices"],
                "verbs": ["list", "watch"],
            },
        ],
    }
    for ns, granted in rules.items():
        role: Any = {"metadata": {"name": ACCOUNT}, "rules": granted}
        binding: Any = {
            "metadata": {"name": ACCOUNT},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ACCOUNT},
            "subjects": [subject],
        }
        rbac.create_namespaced_role(ns, role)
        rbac.create_namespaced_role_binding(ns, binding)


def per_type(sims: dict[str, list[Simulator]], before: dict[str, int]) -> dict[str, int]:
    return {
        gpu: sum(len(s.requests()) - before[s.url] for s in group) for gpu, group in sims.items()
    }


def marks(sims: dict[str, list[Simulator]]) -> dict[str, int]:
    return {s.url: len(s.requests()) for group in sims.values() for s in group}


def assert_share(got: dict[str, int], expected_a: float) -> None:
    total = got["A"] + got["B"]
    assert total == N, got
    sigma = math.sqrt(expected_a * (1 - expected_a) / N)
    assert abs(got["A"] / total - expected_a) <= 4 * sigma, (got, expected_a)


def readyz(router: Router) -> int:
    return _get(f"{router.url}/readyz")[0]


def live(router: Router) -> dict[str, int]:
    status, body = _get(f"{router.url}/healthz")
    assert status == 200
    return dict(json.loads(body)["live"])


@pytest.fixture
def sims(tmp_path: Path) -> Iterator[dict[str, list[Simulator]]]:
    host = own_address()
    started: dict[str, list[Simulator]] = {"A": [], "B": []}
    try:
        for gpu, count in (("A", 2), ("B", 1)):
            for _ in range(count):
                started[gpu].append(start_sim(tmp_path, host))
        yield started
    finally:
        for group in started.values():
            for sim in group:
                terminate(sim.process)


def test_route_follows_its_configmap_and_endpointslices(
    control_plane: ControlPlane,
    kube: Kube,
    namespace: str,
    sims: dict[str, list[Simulator]],
    tmp_path: Path,
) -> None:
    serving = f"{namespace}-s"
    kube.create_namespace(serving)
    core = client.CoreV1Api(kube.api_client)
    discovery = client.DiscoveryV1Api(kube.api_client)
    # A: a named port, one EndpointSlice per server; B: the Service's single unnamed port
    core.create_namespaced_service(
        serving, service_body("sim-a", {"name": "http", "port": 8000, "targetPort": "http"})
    )
    core.create_namespaced_service(serving, service_body("sim-b", {"port": 80, "targetPort": 8000}))
    for k, sim in enumerate(sims["A"]):
        discovery.create_namespaced_endpoint_slice(
            serving, slice_body(f"sim-a-{k}", "sim-a", sim, "http")
        )
    discovery.create_namespaced_endpoint_slice(
        serving, slice_body("sim-b-0", "sim-b", sims["B"][0], None)
    )
    grant(kube, namespace, serving)
    kubeconfig = control_plane.service_account_kubeconfig(namespace, ACCOUNT)

    # started before the operator has published a table: alive, not ready
    router = launch_router(
        tmp_path,
        f"--table-configmap={namespace}/{CONFIGMAP}",
        env={**control_plane.env(), "KUBECONFIG": str(kubeconfig)},
    )
    try:
        assert readyz(router) == 503
        rows = [0] * (N // 3) + [1] * (N // 3) + [2] * (N - 2 * (N // 3))

        configmap: Any = {
            "metadata": {"name": CONFIGMAP},
            "data": {"table.json": document((0.8, 0.2), serving, port_a=8000)},
        }
        core.create_namespaced_config_map(namespace, configmap)
        eventually(lambda: _assert(readyz(router) == 200), timeout=20)
        eventually(lambda: _assert(live(router) == {"A": 2, "B": 1}), timeout=20)
        before = marks(sims)
        assert set(send(router.url, rows)) == {200}
        assert_share(per_type(sims, before), 0.8)
        assert all(len(s.requests()) > before[s.url] for s in sims["A"])  # both of A's servers

        # a new table, without a restart: the counts follow its shares
        core.patch_namespaced_config_map(
            CONFIGMAP, namespace, {"data": {"table.json": document((0.2, 0.8), serving)}}
        )
        router.wait_for(r'melange_route_table_reloads_total\{result="ok"\}', 2)
        # A's port is now named by its name, not its number: A's servers are looked up again
        eventually(lambda: _assert(live(router) == {"A": 2, "B": 1}), timeout=20)
        before = marks(sims)
        assert set(send(router.url, rows)) == {200}
        assert_share(per_type(sims, before), 0.2)

        # a bad table keeps the one in use
        core.patch_namespaced_config_map(CONFIGMAP, namespace, {"data": {"table.json": "{oops"}})
        router.wait_for(r'melange_route_table_reloads_total\{result="error"\}', 1)
        # the ConfigMap deleted keeps it too
        core.delete_namespaced_config_map(CONFIGMAP, namespace)
        before = marks(sims)
        assert set(send(router.url, rows)) == {200}
        assert_share(per_type(sims, before), 0.2)

        # one of A's servers not ready: it gets no request, the other takes A's share
        not_ready = slice_body("sim-a-0", "sim-a", sims["A"][0], "http")
        not_ready["endpoints"][0]["conditions"] = {"ready": False}
        discovery.replace_namespaced_endpoint_slice("sim-a-0", serving, not_ready)
        eventually(lambda: _assert(live(router) == {"A": 1, "B": 1}), timeout=20)
        before = marks(sims)
        assert set(send(router.url, rows)) == {200}
        assert len(sims["A"][0].requests()) == before[sims["A"][0].url]
        assert len(sims["A"][1].requests()) > before[sims["A"][1].url]
        assert_share(per_type(sims, before), 0.2)

        # none of B's ready (its slice deleted): B's share spills to A
        discovery.delete_namespaced_endpoint_slice("sim-b-0", serving)
        eventually(lambda: _assert(live(router) == {"A": 1}), timeout=20)
        before = marks(sims)
        assert set(send(router.url, rows)) == {200}
        assert per_type(sims, before) == {"A": N, "B": 0}
        assert router.sum(r'melange_route_requests_total\{gpu="B",.*\}') > 0  # before
        assert readyz(router) == 200

        # and no type with a ready server: not ready, 503 to a request
        gone = slice_body("sim-a-1", "sim-a", sims["A"][1], "http")
        gone["endpoints"][0]["conditions"] = {"ready": False}
        discovery.replace_namespaced_endpoint_slice("sim-a-1", serving, gone)
        eventually(lambda: _assert(readyz(router) == 503), timeout=20)
        assert set(send(router.url, [0] * 5)) == {503}
    finally:
        terminate(router.process)
        print(f"--- route log (tail) ---\n{router.log_path.read_text()[-6000:]}")


def _assert(condition: bool) -> None:
    assert condition
