"""Status-writer benchmark: how the one writer should send an allocation's status.

    python benchmarks/status.py [--writes 60]

On the real test control plane, writes the status of one allocation (the plan of the e2e spec,
conditions, a rate history) `--writes` times each way, interleaved, each write changing what a
rate poll changes (observedRate, lastObservationTime, one condition's message):
- baseline: a JSON merge patch of the changed fields only (what `melange.controller.loop` sends);
- a merge patch of the whole status;
- server-side apply of the whole status (field manager `melange-operator`, force), which needs the
  whole set of owned fields in every request.
Prints the median and p95 latency, the request size, and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1]))

from kubernetes import client
from tests.controlplane.harness import ControlPlane
from tests.e2e.kube import CRD_FILE, Kube
from tests.e2e.test_operator import SPEC, manifest

from melange import api
from melange.api import conditions
from melange.api.conditions import Condition
from melange.controller import decide
from melange.plan import solver
from melange.plan.result import Plan


def full_status(k: int, plan: Plan) -> dict[str, Any]:
    now = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=k)
    status = decide.plan_status(plan, datetime(2026, 1, 1, tzinfo=UTC))
    status.update(decide.observation_status(34.0 + k % 7, now, now, []))
    status["observedGeneration"] = 1
    status["conditions"] = conditions.set_conditions(
        None,
        [
            Condition("Ready", "True", "Reconciled", "node pools match the plan"),
            Condition("RateObserved", "True", "Observed", f"{34 + k % 7} req/s"),
        ],
        1,
        now,
    )
    return status


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=60)
    args = parser.parse_args()

    with ControlPlane() as cp:
        kube = Kube(cp.kubeconfig_path)
        for doc in kube.apply_file(CRD_FILE):
            kube.wait_established(doc["metadata"]["name"])
        namespace = f"bench-{uuid.uuid4().hex[:6]}"
        kube.create_namespace(namespace)
        kube.create(manifest("chat"), namespace)

        custom = client.CustomObjectsApi(kube.api_client)
        plan = solver.solve_spec(api.validate_spec(SPEC))
        statuses = [full_status(k, plan) for k in range(args.writes + 1)]  # built before timing

        def send(content_type: str, body: dict[str, Any], **query: Any) -> int:
            custom.patch_namespaced_custom_object_status(
                "melange.dev",
                "v1alpha1",
                namespace,
                "melangeallocations",
                "chat",
                body,
                _content_type=content_type,
                **query,
            )
            return len(json.dumps(body))

        def changed(k: int) -> int:
            status, before = statuses[k], statuses[k - 1]
            delta = {key: v for key, v in status.items() if before.get(key) != v}
            return send("application/merge-patch+json", {"status": delta})

        def merge_whole(k: int) -> int:
            return send("application/merge-patch+json", {"status": statuses[k]})

        def apply_whole(k: int) -> int:
            body = {
                "apiVersion": "melange.dev/v1alpha1",
                "kind": "MelangeAllocation",
                "metadata": {"name": "chat", "namespace": namespace},
                "status": statuses[k],
            }
            return send(
                "application/apply-patch+yaml", body, field_manager="melange-operator", force=True
            )

        ways: dict[str, Callable[[int], int]] = {
            "merge patch, changed fields (baseline)": changed,
            "merge patch, whole status": merge_whole,
            "server-side apply, whole status": apply_whole,
        }
        merge_whole(0)  # a full status to start from
        times: dict[str, list[float]] = {name: [] for name in ways}
        sizes: dict[str, int] = {}
        for k in range(1, args.writes + 1):
            for name, way in ways.items():
                started = time.perf_counter()
                sizes[name] = way(k)
                times[name].append(time.perf_counter() - started)

    base = statistics.median(times["merge patch, changed fields (baseline)"])
    print(f"{'status write':<42}{'median ms':>10}{'p95 ms':>9}{'bytes':>8}{'x baseline':>12}")
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:<42}{median * 1e3:>10.2f}{percentile(values, 0.95) * 1e3:>9.2f}"
            f"{sizes[name]:>8}{median / base:>12.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
