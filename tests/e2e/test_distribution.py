"""Following the live request-size distribution: the emitter's vLLM token histograms change shape,
a real Prometheus scrapes them, and `melange run` re-fits the workload matrix and re-solves."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from click.testing import CliRunner

from melange import api
from melange.cli import main
from melange.plan import solver

from .conftest import EMITTER_RATE
from .kube import Kinds, Kube, eventually, reasons
from .operator_process import OperatorProcess
from .prometheus import MODEL, LoadEmitter, PrometheusServer
from .test_operator import SPEC, make_pools, pool_replicas, pool_versions
from .test_rates import at_plan_near, metric_values, rate_manifest, status_of

pytestmark = pytest.mark.e2e

WINDOW = 10
TOLERANCE = 0.05

# Cumulative shares at vLLM's 1-2-5 bounds. Each shape puts its mass in histogram buckets that lie
# inside one spec bucket (inputs [1, 100), [100, 1000), [1000, 16000); outputs [1, 100),
# [100, 1000)), so the expected marginals are exact.
PROMPT_SHORT = [(10, 0), (20, 0), (50, 0.7), (100, 0.7), (200, 0.7), (500, 1.0), (1000, 1.0)]
PROMPT_SHORT += [(2000, 1.0), (5000, 1.0), (10000, 1.0)]
PROMPT_LONG = [(10, 0), (20, 0), (50, 0.2), (100, 0.2), (200, 0.2), (500, 0.4), (1000, 0.4)]
PROMPT_LONG += [(2000, 0.4), (5000, 1.0), (10000, 1.0)]
GENERATION = [(10, 0), (20, 0), (50, 0.75), (100, 0.75), (200, 0.75), (500, 1.0), (1000, 1.0)]
GENERATION += [(2000, 1.0)]
SHORT_ROWS, LONG_ROWS, COLUMNS = [0.7, 0.3, 0.0], [0.2, 0.2, 0.6], [0.75, 0.25]


def sums(matrix: list[list[float]]) -> tuple[list[float], list[float]]:
    return [sum(row) for row in matrix], [sum(col) for col in zip(*matrix, strict=True)]


def near(values: list[float], expected: list[float], within: float) -> bool:
    return 0.5 * sum(abs(a - b) for a, b in zip(values, expected, strict=True)) <= within


def plan_for(status: dict[str, Any]) -> dict[str, int]:
    spec = dict(SPEC, workload={**SPEC["workload"], "distribution": status["solvedDistribution"]})
    return solver.solve_spec(api.validate_spec(spec), status["solvedRate"]).replicas()


def at_distribution(kube: Kube, namespace: str, rows: list[float]) -> dict[str, Any]:
    """Solved for a distribution with these row sums (within the tolerance), pools at its plan."""
    status = status_of(kube, "chat", namespace)
    solved = status.get("solvedDistribution")
    assert solved is not None
    solved_rows, solved_columns = sums(solved)
    assert near(solved_rows, rows, TOLERANCE + 0.01), solved_rows
    assert near(solved_columns, COLUMNS, TOLERANCE + 0.01), solved_columns
    assert pool_replicas(kube, namespace) == plan_for(status)
    return status


def test_refits_the_distribution_and_resolves_when_its_shape_moves(
    kube: Kube,
    namespace: str,
    operator: OperatorProcess,
    emitter: LoadEmitter,
    prometheus: PrometheusServer,
) -> None:
    emitter.set_shapes(prompt=PROMPT_SHORT, generation=GENERATION)
    manifest = rate_manifest("chat", prometheus.url)
    manifest["spec"]["workload"]["fromPrometheus"] = {
        "windowSeconds": WINDOW,
        "driftTolerance": TOLERANCE,
        "minRequests": 1e9,
    }
    make_pools(kube, namespace, replicas=0)
    kube.create(manifest, namespace)

    # Too few requests: said so, and the plan keeps the spec's own matrix.
    condition = kube.wait_condition(
        "chat", namespace, "DistributionObserved", "False", "TooFewRequests", timeout=60
    )
    assert "fewer than minRequests (1e+09)" in condition["message"]
    eventually(lambda: at_plan_near(kube, "chat", namespace, EMITTER_RATE))
    assert "solvedDistribution" not in status_of(kube, "chat", namespace)

    # Enough requests: the matrix fitted to the histograms' marginals, and a plan for it.
    kube.merge_patch(
        Kinds.allocation,
        "chat",
        namespace,
        {"spec": {"workload": {"fromPrometheus": {"minRequests": 10}}}},
    )
    kube.wait_condition("chat", namespace, "DistributionObserved", "True", "Observed", timeout=60)
    short = eventually(lambda: at_distribution(kube, namespace, SHORT_ROWS), timeout=60)
    observed_rows, observed_columns = sums(short["observedDistribution"])
    assert observed_rows[2] == 0  # no long prompts observed: the fitted matrix has none either
    assert near(observed_rows, SHORT_ROWS, 0.01)
    assert near(observed_columns, COLUMNS, 0.01)
    short_pools = pool_replicas(kube, namespace)
    assert short_pools != solver.solve_spec(api.validate_spec(SPEC), short["solvedRate"]).replicas()

    # The traffic turns to long prompts at the same rate: re-fitted, re-solved, pools follow.
    emitter.set_shapes(prompt=PROMPT_LONG)
    long = eventually(lambda: at_distribution(kube, namespace, LONG_ROWS), timeout=90)
    assert pool_replicas(kube, namespace) != short_pools
    assert long["solvedRate"] == pytest.approx(short["solvedRate"], rel=2 * TOLERANCE)
    drift = [
        e
        for e in kube.wait_events(namespace, "chat", "DistributionDrift")
        if e["reason"] == "DistributionDrift"
    ]
    assert drift
    assert "moved between buckets" in drift[-1]["message"]
    assert "input 1000-16000" in " ".join(e["message"] for e in drift)
    values = metric_values(operator, namespace)
    assert values["melange_solves_total", "optimal,distribution_drift"] >= 1
    assert 0 <= values["melange_distribution_distance", ""] <= 1

    # A restart resumes from status.solvedDistribution: no node pool changes.
    versions = pool_versions(kube, namespace)
    operator.restart()
    observed_at = status_of(kube, "chat", namespace)["lastObservationTime"]

    def polled_again() -> None:
        assert status_of(kube, "chat", namespace)["lastObservationTime"] != observed_at

    eventually(polled_again, timeout=60)
    time.sleep(1)
    assert pool_versions(kube, namespace) == versions
    assert "DistributionDrift" in reasons(kube.events(namespace, "chat"))


def test_a_spec_without_a_model_for_the_histograms_is_refused(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    """CEL refuses it at the API server, before the operator ever sees it."""
    manifest = rate_manifest("chat", "http://127.0.0.1:9", query="sum(rate(x[1m]))")
    manifest["spec"]["workload"]["fromPrometheus"] = {}
    with pytest.raises(Exception, match=r"workload.fromPrometheus needs a modelName"):
        kube.create(manifest, namespace)


def test_workload_from_prometheus_prints_the_fitted_block(
    emitter: LoadEmitter, prometheus: PrometheusServer
) -> None:
    emitter.set_shapes(prompt=PROMPT_SHORT, generation=GENERATION)
    time.sleep(WINDOW + 2)  # the whole window at the new shape
    edges = ["--input-edges", "1,100,1000,16000", "--output-edges", "1,100,1000"]
    args = ["workload", "--from-prometheus", prometheus.url, "--window", str(WINDOW), *edges]
    result = CliRunner().invoke(main, [*args, "--model", MODEL, "-o", "json"])
    assert result.exit_code == 0, result.output
    block = json.loads(result.stdout)
    assert block["buckets"] == {
        "inputTokens": [1, 100, 1000, 16000],
        "outputTokens": [1, 100, 1000],
    }
    rows, columns = sums(block["workload"]["distribution"])
    assert near(rows, SHORT_ROWS, 0.01)
    assert near(columns, COLUMNS, 0.01)
    # a uniform prior fits the product of the marginals
    assert block["workload"]["distribution"][0][0] == pytest.approx(0.7 * 0.75, abs=0.01)
    assert block["workload"]["totalRate"] == pytest.approx(EMITTER_RATE, rel=0.05)

    unknown = CliRunner().invoke(main, [*args, "--model", "no-such-model"])
    assert unknown.exit_code == 2
    assert "no prompt-tokens histogram series" in unknown.stderr

    down = CliRunner().invoke(
        main, ["workload", "--from-prometheus", "http://127.0.0.1:9", "--model", MODEL, *edges]
    )
    assert down.exit_code == 2
    assert "cannot connect to 127.0.0.1:9" in down.stderr
