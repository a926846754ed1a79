"""Operator benchmark on the real test control plane: apply-to-patched latency and memory.

    python benchmarks/reconcile.py [--allocations 20] [--total 50]

Starts etcd + kube-apiserver (tests/controlplane, built by tests/controlplane/build.sh) and
`melange run` as a process, then:
- baseline: a plain API round trip done by this process (patch a Deployment's /scale, read it back);
- apply-to-patched: from creating an allocation to all its node pools at the plan (three pools of three
  kinds: a Deployment, a MachineDeployment-shaped CRD, a replicasPath kind), one allocation at a time;
- the operator's resident memory once `--total` allocations are Ready.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from tests.controlplane.harness import ControlPlane
from tests.e2e.kube import CRD_FILE, MANIFESTS, Kinds, Kube, eventually
from tests.e2e.operator_process import OperatorProcess
from tests.e2e.test_operator import SPEC, manifest

from melange import api
from melange.plan import solver


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wait_until(predicate: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("not reached")
        time.sleep(0.005)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allocations", type=int, default=20)
    parser.add_argument("--total", type=int, default=50)
    args = parser.parse_args()

    with ControlPlane() as cp:
        kube = Kube(cp.kubeconfig_path)
        for doc in [*kube.apply_file(CRD_FILE), *kube.apply_file(MANIFESTS / "test-targets.yaml")]:
            kube.wait_established(doc["metadata"]["name"])
        namespace = f"bench-{uuid.uuid4().hex[:6]}"
        kube.create_namespace(namespace)
        workdir = Path(cp.workdir)
        operator = OperatorProcess(cp, namespace, workdir)
        operator.start()
        try:
            baseline = []
            kube.deployment("baseline", namespace, 0)
            for k in range(args.allocations):
                started = time.perf_counter()
                kube.merge_patch(
                    Kinds.deployment, "baseline", namespace, {"spec": {"replicas": k + 1}}
                )
                wait_until(
                    lambda k=k: kube.replicas(Kinds.deployment, "baseline", namespace) == k + 1
                )
                baseline.append(time.perf_counter() - started)

            expected = solver.solve_spec(api.validate_spec(SPEC)).replicas()
            latencies = []
            for k in range(args.allocations):
                spec = copy.deepcopy(SPEC)
                names = {}
                for gpu in spec["gpus"]:
                    gpu["scaleTargetRef"]["name"] = names[gpu["name"]] = (
                        f"{gpu['name'].lower()}-{k}"
                    )
                kube.deployment(names["L4"], namespace, 0)
                kube.machine_deployment(names["A100"], namespace, 0)
                kube.node_pool(names["H100"], namespace, 3)
                started = time.perf_counter()
                kube.create(manifest(f"bench-{k}", spec), namespace)
                wait_until(
                    lambda names=names: (
                        kube.replicas(Kinds.deployment, names["L4"], namespace) == expected["L4"]
                        and kube.replicas(Kinds.machine_deployment, names["A100"], namespace)
                        == expected["A100"]
                        and kube.replicas(Kinds.node_pool, names["H100"], namespace)
                        == expected["H100"]
                    )
                )
                latencies.append(time.perf_counter() - started)

            dry = copy.deepcopy(SPEC)
            dry["dryRun"] = True
            for k in range(args.allocations, args.total):
                kube.create(manifest(f"bench-{k}", dry), namespace)

            def all_ready() -> None:
                rows = kube.table(namespace)["rows"]
                assert len(rows) == args.total
                assert {r["cells"][1] for r in rows} == {"True"}

            eventually(all_ready, timeout=300, interval=0.5)
            rss = operator.rss_bytes()
        finally:
            operator.stop()

    base = statistics.median(baseline)
    median, p95 = statistics.median(latencies), percentile(latencies, 0.95)
    print(f"{'measure':<44}{'median s':>10}{'p95 s':>10}{'x baseline':>12}")
    print(
        f"{'baseline: patch /scale + read back':<44}{base:>10.3f}{percentile(baseline, 0.95):>10.3f}{1:>12.1f}"
    )
    print(
        f"{'apply allocation -> 3 pools at the plan':<44}{median:>10.3f}{p95:>10.3f}{median / base:>12.1f}"
    )
    print(f"operator RSS with {args.total} allocations Ready: {rss / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
