"""Rate-drift benchmark: from a step in the request rate to node pools at the new plan.

    python benchmarks/rates.py [--steps 10] [--interval 5]

A real Prometheus (Debian's `prometheus`) scrapes a vLLM-like emitter every second; the allocation
uses the default query with `rangeSeconds: 4`, polls every `--interval` seconds, tolerance 10%, and
a scale-down stabilization window of 0 s (so steps down count as steps up do). The request rate
alternates between 34 and 68 req/s, at a random moment within the poll period (fixed seed).

- baseline, measured in the same process: from a step in the emitter to Prometheus' own answer
  showing it (a change beyond the tolerance; and the new rate within 2%);
- the operator: from the step to the first node-pool patch, and to every pool at the plan solved
  for a rate the new one keeps (within the tolerance).
Goal: the median step-to-plan time under 2 poll intervals + 1 s.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from tests.controlplane.harness import ControlPlane
from tests.e2e.kube import CRD_FILE, MANIFESTS, Kube
from tests.e2e.operator_process import OperatorProcess
from tests.e2e.prometheus import MODEL, SCRAPE_INTERVAL_SECONDS, LoadEmitter, PrometheusServer
from tests.e2e.test_operator import SPEC, make_pools, pool_replicas

from melange import api
from melange.plan import solver
from melange.signals import rates

LOW, HIGH = 34.0, 68.0
TOLERANCE = 0.1
RANGE_SECONDS = 4


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wait_until(predicate: Callable[[], bool], timeout: float = 120.0, poll: float = 0.05) -> float:
    """Seconds until `predicate` holds."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError("not reached")
        time.sleep(poll)
    return time.monotonic() - started


def near(value: float | None, rate: float, within: float = 0.02) -> bool:
    return value is not None and abs(value - rate) < within * rate


def moved(value: float | None, previous: float) -> bool:
    return value is not None and abs(value - previous) > TOLERANCE * previous


def plan_for(rate: float) -> dict[str, int]:
    return solver.solve_spec(api.validate_spec(SPEC), rate).replicas()


def keeps(solved: float | None, rate: float) -> bool:
    """`rate` observed against a plan solved for `solved` gives no re-solve."""
    return (
        solved is not None
        and rate / (1 + TOLERANCE) <= solved * 1.02
        and (solved * 0.98 <= rate / (1 - TOLERANCE))
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--interval", type=int, default=5, help="intervalSeconds (>= 5)")
    args = parser.parse_args()
    chooser = random.Random(4)

    workdir = Path(tempfile.mkdtemp(prefix="melange-bench-"))
    emitter = LoadEmitter(workdir, LOW)
    prometheus = PrometheusServer(workdir / "prometheus", [emitter.address])
    prometheus.start()
    query = rates.default_query(MODEL, RANGE_SECONDS)
    try:
        prometheus.wait_for_value(query)
        wait_until(lambda: near(prometheus.value(query), LOW), 60)

        # Baseline: how long Prometheus itself takes to show a step (scrape + rate() range).
        detect, settle = [], []
        rate = LOW
        for _ in range(args.steps):
            time.sleep(chooser.uniform(0, SCRAPE_INTERVAL_SECONDS))
            previous, rate = rate, HIGH if rate == LOW else LOW
            emitter.set_rate(rate)
            started = time.monotonic()
            wait_until(partial(lambda p: moved(prometheus.value(query), p), previous), 30)
            detect.append(time.monotonic() - started)
            wait_until(partial(lambda r: near(prometheus.value(query), r), rate), 30)
            settle.append(time.monotonic() - started)
        emitter.set_rate(LOW)
        wait_until(lambda: near(prometheus.value(query), LOW), 60)

        with ControlPlane() as cp:
            kube = Kube(cp.kubeconfig_path)
            for doc in [
                *kube.apply_file(CRD_FILE),
                *kube.apply_file(MANIFESTS / "test-targets.yaml"),
            ]:
                kube.wait_established(doc["metadata"]["name"])
            namespace = f"bench-{uuid.uuid4().hex[:6]}"
            kube.create_namespace(namespace)
            operator = OperatorProcess(cp, namespace, workdir)
            operator.start()
            try:
                make_pools(kube, namespace, replicas=0)
                spec = copy.deepcopy(SPEC)
                spec["rateSource"] = {
                    "prometheus": {
                        "url": prometheus.url,
                        "modelName": MODEL,
                        "rangeSeconds": RANGE_SECONDS,
                    },
                    "intervalSeconds": args.interval,
                    "driftTolerance": TOLERANCE,
                    "scaleDownStabilizationSeconds": 0,
                }
                kube.create(
                    {
                        "apiVersion": "melange.dev/v1alpha1",
                        "kind": "MelangeAllocation",
                        "metadata": {"name": "bench"},
                        "spec": spec,
                    },
                    namespace,
                )

                def at_plan(rate: float) -> bool:
                    status = kube.allocation("bench", namespace).get("status") or {}
                    solved = status.get("solvedRate")
                    if solved is None or status.get("lastObservationTime") is None:
                        return False
                    return keeps(solved, rate) and pool_replicas(kube, namespace) == plan_for(
                        float(solved)
                    )

                wait_until(lambda: at_plan(LOW), 120)
                first_patch, at_new_plan = [], []
                rate = LOW
                for _ in range(args.steps):
                    time.sleep(chooser.uniform(0, args.interval))
                    before = pool_replicas(kube, namespace)
                    rate = HIGH if rate == LOW else LOW
                    emitter.set_rate(rate)
                    started = time.monotonic()
                    wait_until(partial(lambda b: pool_replicas(kube, namespace) != b, before))
                    first_patch.append(time.monotonic() - started)
                    wait_until(partial(at_plan, rate))
                    at_new_plan.append(time.monotonic() - started)
            finally:
                operator.stop()
    finally:
        prometheus.stop()
        emitter.stop()

    base = statistics.median(settle)
    print(
        f"scrape interval {SCRAPE_INTERVAL_SECONDS} s, rate() range {RANGE_SECONDS} s, poll "
        f"interval {args.interval} s, tolerance {TOLERANCE:.0%}, stabilization 0 s; "
        f"{args.steps} steps between {LOW:g} and {HIGH:g} req/s"
    )
    print(f"{'measure':<52}{'median s':>10}{'p90 s':>8}{'x baseline':>12}")
    rows = [
        ("baseline: step -> Prometheus shows > tolerance", detect),
        ("baseline: step -> Prometheus shows the new rate", settle),
        ("step -> first node-pool patch", first_patch),
        ("step -> node pools at the plan for the new rate", at_new_plan),
    ]
    for label, values in rows:
        median = statistics.median(values)
        print(f"{label:<52}{median:>10.2f}{percentile(values, 0.9):>8.2f}{median / base:>12.1f}")
    goal = 2 * args.interval + 1
    verdict = "met" if statistics.median(at_new_plan) < goal else "NOT met"
    print(f"goal: median step -> plan < 2 intervals + 1 s = {goal} s: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
