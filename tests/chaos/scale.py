"""Many allocations on one operator: what it costs to bring them all to Ready, and to keep them.

Shared by `test_scale.py` (which asserts the outcome is right and prints the numbers) and
`benchmarks/scale.py` (which only measures). The control plane must audit every request
(`AUDIT_POLICY_ALL_REQUESTS`), so the operator's reads are counted as well as its writes.
"""

from __future__ import annotations

import copy
import functools
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.controlplane.harness import ControlPlane
from tests.e2e.kube import CRD_FILE, Kinds, Kube, eventually
from tests.e2e.operator_process import OperatorProcess
from tests.e2e.test_operator import SPEC, expected_replicas, manifest

from . import audit

WRITE_VERBS = {"create", "update", "patch", "delete"}


def spec_for(rate: float, names: tuple[str, str]) -> dict[str, Any]:
    """Two GPU types of the end-to-end SPEC, each sized through its own Deployment."""
    spec = copy.deepcopy(SPEC)
    spec["gpus"] = spec["gpus"][:2]
    spec["workload"]["totalRate"] = rate
    for gpu, name in zip(spec["gpus"], names, strict=True):
        gpu["scaleTargetRef"] = {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    return spec


@functools.cache
def _plan(rate: float) -> tuple[int, int]:
    replicas = expected_replicas(spec_for(rate, ("l4", "a100")))
    return replicas["L4"], replicas["A100"]


@dataclass
class Measurements:
    allocations: int
    namespaces: int
    create_seconds: float = 0.0  # this client creating them all, one request each (the baseline)
    ready_seconds: float = 0.0  # from the first create to every allocation Ready
    rss_bytes: int = 0  # the operator's VmRSS once all are Ready
    window_seconds: float = 0.0
    requests: Counter[str] = field(default_factory=Counter)  # verb -> count, while steady
    pool_writes_while_steady: int = 0
    not_at_plan: list[str] = field(default_factory=list)  # pools not at their plan, once Ready

    @property
    def per_second(self) -> float:
        return sum(self.requests.values()) / self.window_seconds

    @property
    def reads_per_second(self) -> float:
        reads = sum(n for verb, n in self.requests.items() if verb not in WRITE_VERBS)
        return reads / self.window_seconds

    def report(self, resync: float) -> str:
        verbs = ", ".join(f"{verb} {n}" for verb, n in sorted(self.requests.items()))
        return "\n".join(
            [
                f"{self.allocations} allocations in {self.namespaces} namespaces "
                f"(2 Deployment pools each), --resync-seconds {resync:g}",
                f"  creating them (baseline):  {self.create_seconds:.1f} s",
                f"  time to all Ready:         {self.ready_seconds:.1f} s",
                f"  operator RSS (VmRSS):      {self.rss_bytes / 2**20:.0f} MiB",
                f"  API requests while steady: {self.per_second:.1f}/s "
                f"(reads {self.reads_per_second:.1f}/s) over {self.window_seconds:.0f} s: {verbs}",
                f"  pool writes while steady:  {self.pool_writes_while_steady}",
            ]
        )


def measure(
    cp: ControlPlane,
    workdir: Path,
    *,
    namespaces: int = 10,
    per_namespace: int = 20,
    resync: float = 10.0,
    window: float = 20.0,
    ready_timeout: float = 300.0,
) -> Measurements:
    """Create the pools, start `melange run` on every namespace, create every allocation at once,
    wait until all are Ready, then watch the operator's requests over `window` seconds."""
    kube = Kube(cp.kubeconfig_path)
    for document in kube.apply_file(CRD_FILE):
        kube.wait_established(document["metadata"]["name"])
    prefix = f"s-{uuid.uuid4().hex[:6]}"
    names = [f"{prefix}-{n}" for n in range(namespaces)]
    result = Measurements(allocations=namespaces * per_namespace, namespaces=namespaces)
    plans: dict[tuple[str, str], int] = {}
    manifests: list[tuple[str, dict[str, Any]]] = []
    for n, namespace in enumerate(names):
        kube.create_namespace(namespace)
        for k in range(per_namespace):
            rate = 10 + 6 * ((n + k) % 10)
            pools = (f"a{k}-l4", f"a{k}-a100")
            for pool, value in zip(pools, _plan(rate), strict=True):
                kube.deployment(pool, namespace, 1)
                plans[(namespace, pool)] = value
            manifests.append((namespace, manifest(f"a{k}", spec_for(rate, pools))))

    extra: list[str] = ["--resync-seconds", f"{resync:g}"]
    for namespace in names[1:]:
        extra += ["-n", namespace]
    operator = OperatorProcess(cp, names[0], workdir, identity="scale", extra_args=tuple(extra))
    operator.start()
    try:
        started = time.monotonic()
        for namespace, body in manifests:
            kube.create(body, namespace)
        result.create_seconds = time.monotonic() - started
        eventually(
            lambda: _all_ready(kube, names, per_namespace), timeout=ready_timeout, interval=0.5
        )
        result.ready_seconds = time.monotonic() - started
        result.rss_bytes = operator.rss_bytes()
        for namespace in names:
            deployments = kube.dynamic.get(kube.resource(Kinds.deployment), namespace=namespace)
            for item in deployments.to_dict()["items"]:
                pool = item["metadata"]["name"]
                if item["spec"]["replicas"] != plans[(namespace, pool)]:
                    result.not_at_plan.append(
                        f"{namespace}/{pool}: {item['spec']['replicas']}, "
                        f"plan {plans[(namespace, pool)]}"
                    )

        steady = time.time()
        time.sleep(window)
        result.window_seconds = time.time() - steady
        events = audit.between(operator.writes(), steady, steady + result.window_seconds)
        seen: dict[str, str] = {e["auditID"]: e["verb"] for e in events}
        result.requests = Counter(seen.values())
        result.pool_writes_while_steady = sum(
            len(audit.succeeded(audit.pool_patches(events, namespace))) for namespace in names
        )
    finally:
        operator.stop()
    return result


def _all_ready(kube: Kube, namespaces: list[str], per_namespace: int) -> None:
    for namespace in namespaces:
        listed = kube.dynamic.get(kube.resource(Kinds.allocation), namespace=namespace).to_dict()
        items = listed["items"]
        assert len(items) == per_namespace
        for item in items:
            status = item.get("status") or {}
            ready = [c for c in status.get("conditions") or [] if c["type"] == "Ready"]
            assert ready, item["metadata"]["name"]
            assert ready[0]["status"] == "True", (item["metadata"]["name"], ready[0])
            assert status.get("observedGeneration") == item["metadata"]["generation"]
