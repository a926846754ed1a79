"""Rescaling from the live request rate: a real Prometheus scraping a vLLM-like emitter every second,
the real control plane, and `melange run` as a process polling every 5 s (the CRD's minimum)."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from melange import api
from melange.plan import solver

from .conftest import EMITTER_RATE
from .kube import Kinds, Kube, eventually, reasons
from .operator_process import OperatorProcess
from .prometheus import MODEL, LoadEmitter, PrometheusServer, self_signed_certificate
from .test_operator import SPEC, make_pools, pool_replicas, pool_versions, wait_ready

pytestmark = pytest.mark.e2e

INTERVAL = 5
WINDOW = 20
TOLERANCE = 0.1
CREDENTIALS = "melange.dev/rate-source-credentials"  # the label an owner opts a credential in with


def rate_manifest(name: str, url: str, **prometheus: Any) -> dict[str, Any]:
    spec = copy.deepcopy(SPEC)
    spec["rateSource"] = {
        "prometheus": {"url": url, **(prometheus or {"modelName": MODEL, "rangeSeconds": 4})},
        "intervalSeconds": INTERVAL,
        "driftTolerance": TOLERANCE,
        "scaleDownStabilizationSeconds": WINDOW,
    }
    return {
        "apiVersion": "melange.dev/v1alpha1",
        "kind": "MelangeAllocation",
        "metadata": {"name": name},
        "spec": spec,
    }


def plan_for(rate: float) -> dict[str, int]:
    return solver.solve_spec(api.validate_spec(SPEC), rate).replicas()


def status_of(kube: Kube, name: str, namespace: str) -> dict[str, Any]:
    return dict(kube.allocation(name, namespace).get("status") or {})


def wait_observed(
    kube: Kube,
    name: str,
    namespace: str,
    status: str = "True",
    reason: str | None = None,
    message: str = "",
    timeout: float = 60,
) -> dict[str, Any]:
    return kube.wait_condition(name, namespace, "RateObserved", status, reason, message, timeout)


def at_plan_near(kube: Kube, name: str, namespace: str, rate: float) -> dict[str, int | None]:
    """The plan was solved for a rate that `rate` keeps (within the tolerance, give or take the
    measurement's 2%), and every node pool is at it."""
    solved = status_of(kube, name, namespace).get("solvedRate")
    assert solved is not None
    assert rate / (1 + TOLERANCE) * 0.98 <= solved <= rate / (1 - TOLERANCE) * 1.02, solved
    replicas = pool_replicas(kube, namespace)
    assert replicas == plan_for(solved), (solved, replicas)
    return replicas


def start_at_plan(kube: Kube, namespace: str, prometheus: PrometheusServer) -> dict[str, str]:
    """Pools, an allocation reading the emitter's rate, both settled; the pools' resourceVersions."""
    make_pools(kube, namespace, replicas=0)
    kube.create(rate_manifest("chat", prometheus.url), namespace)
    wait_observed(kube, "chat", namespace)
    eventually(lambda: at_plan_near(kube, "chat", namespace, EMITTER_RATE))
    return pool_versions(kube, namespace)


def metric_values(operator: OperatorProcess, namespace: str) -> dict[tuple[str, str], float]:
    """Samples of this namespace's allocation, keyed by (name, the one extra label's value)."""
    values = {}
    for family in text_string_to_metric_families(operator.metrics()):
        for sample in family.samples:
            if sample.labels.get("namespace") == namespace:
                extra = [
                    v
                    for k, v in sorted(sample.labels.items())
                    if k not in {"namespace", "allocation"}
                ]
                values[sample.name, ",".join(extra)] = sample.value
    return values


def test_follows_the_rate_up_at_once_and_down_after_the_window(
    kube: Kube,
    namespace: str,
    operator: OperatorProcess,
    emitter: LoadEmitter,
    prometheus: PrometheusServer,
) -> None:
    make_pools(kube, namespace, replicas=0)
    kube.create(rate_manifest("chat", prometheus.url), namespace)
    wait_ready(kube, "chat", namespace)
    wait_observed(kube, "chat", namespace)
    eventually(lambda: at_plan_near(kube, "chat", namespace, EMITTER_RATE))
    assert not kube.allocation("chat", namespace)["metadata"].get("finalizers")  # polled, no timer

    # Up: as soon as an observation exceeds the solved rate by more than the tolerance.
    emitter.set_rate(2 * EMITTER_RATE)
    high = eventually(lambda: at_plan_near(kube, "chat", namespace, 2 * EMITTER_RATE), timeout=60)
    assert high != plan_for(EMITTER_RATE)
    drift = [
        e for e in kube.wait_events(namespace, "chat", "RateDrift") if e["reason"] == "RateDrift"
    ]
    assert drift
    assert "re-solved for" in drift[0]["message"]
    values = metric_values(operator, namespace)
    assert values["melange_solves_total", "optimal,rate_drift"] >= 1
    assert values["melange_observed_request_rate", ""] > EMITTER_RATE
    assert values["melange_rate_source_up", ""] == 1

    # Down: only once the high rate has left the stabilization window. The operator restarts
    # meanwhile and resumes the window from status.rateHistory.
    emitter.set_rate(EMITTER_RATE)
    stepped = time.monotonic()
    history = status_of(kube, "chat", namespace)["rateHistory"]
    assert max(h["rate"] for h in history) > 1.5 * EMITTER_RATE
    operator.restart()
    changed_at: list[float] = []

    def lowered() -> None:
        if pool_replicas(kube, namespace) != high and not changed_at:
            changed_at.append(time.monotonic())
        at_plan_near(kube, "chat", namespace, EMITTER_RATE)

    eventually(lowered, timeout=90)
    # The last high observation came at most one interval before the step.
    assert changed_at[0] - stepped >= WINDOW - INTERVAL
    kube.wait_events(namespace, "chat", "RateDrift")


def test_jitter_within_tolerance_patches_nothing(
    kube: Kube,
    namespace: str,
    operator: OperatorProcess,
    emitter: LoadEmitter,
    prometheus: PrometheusServer,
) -> None:
    versions = start_at_plan(kube, namespace, prometheus)
    solved = status_of(kube, "chat", namespace)["solvedRate"]

    observations: set[str] = set()
    deadline = time.monotonic() + 90
    k = 0
    while len(observations) < 6:  # six polls, each seeing a rate within +-5% of the plan's
        assert time.monotonic() < deadline, observations
        k += 1
        emitter.set_rate(EMITTER_RATE * (1.05 if k % 2 else 0.95))
        time.sleep(0.7)
        status = status_of(kube, "chat", namespace)
        observations.add(status["lastObservationTime"])
        assert abs(status["observedRate"] - EMITTER_RATE) < TOLERANCE * EMITTER_RATE

    assert pool_versions(kube, namespace) == versions
    assert status_of(kube, "chat", namespace)["solvedRate"] == solved
    assert "RateDrift" not in reasons(kube.events(namespace, "chat"))


def test_prometheus_down_keeps_the_plan_then_recovers(
    kube: Kube,
    namespace: str,
    operator: OperatorProcess,
    emitter: LoadEmitter,
    prometheus: PrometheusServer,
) -> None:
    versions = start_at_plan(kube, namespace, prometheus)

    prometheus.stop()
    emitter.set_rate(2 * EMITTER_RATE)  # unseen while Prometheus is down
    condition = wait_observed(kube, "chat", namespace, "False", "PrometheusUnavailable")
    assert condition["message"] == (
        f"cannot connect to 127.0.0.1:{prometheus.port}: Connection refused; "
        "the current plan and node pools are kept"
    )

    def failed_three_times() -> None:
        values = metric_values(operator, namespace)
        assert values["melange_rate_queries_total", "PrometheusUnavailable"] >= 3
        assert values["melange_rate_source_up", ""] == 0
        assert values["melange_errors_total", "RateSourceUnavailable"] >= 3

    eventually(failed_three_times, timeout=60)
    assert pool_versions(kube, namespace) == versions
    assert status_of(kube, "chat", namespace)["solvedRate"] == pytest.approx(
        EMITTER_RATE, rel=TOLERANCE
    )
    events = [
        e
        for e in kube.wait_events(namespace, "chat", "PrometheusUnavailable")
        if e["reason"] == "PrometheusUnavailable"
    ]
    assert len(events) == 1  # one Event for the transition, not one per failed query
    assert events[0]["type"] == "Warning"

    prometheus.start()
    wait_observed(kube, "chat", namespace, "True", "Observed")
    eventually(lambda: at_plan_near(kube, "chat", namespace, 2 * EMITTER_RATE), timeout=60)


def test_slow_prometheus_times_out_and_recovers(
    kube: Kube,
    namespace: str,
    operator: OperatorProcess,
    emitter: LoadEmitter,
    prometheus: PrometheusServer,
) -> None:
    versions = start_at_plan(kube, namespace, prometheus)

    prometheus.pause()  # accepts connections, never answers
    try:
        condition = wait_observed(kube, "chat", namespace, "False", "PrometheusUnavailable")
        assert condition["message"].startswith(
            f"no answer from {prometheus.url}/api/v1/query within {INTERVAL} s (timed out)"
        )
        assert pool_versions(kube, namespace) == versions
    finally:
        prometheus.resume()
    wait_observed(kube, "chat", namespace, "True", "Observed")
    assert pool_versions(kube, namespace) == versions


def test_query_problems_are_reported_and_change_nothing(
    kube: Kube,
    namespace: str,
    operator: OperatorProcess,
    emitter: LoadEmitter,
    prometheus: PrometheusServer,
) -> None:
    versions = start_at_plan(kube, namespace, prometheus)
    counter = emitter.metric_name

    syntax_error = f"sum(rate({counter}[4s])"
    prometheus_says = prometheus.query(syntax_error)
    assert prometheus_says["status"] == "error"
    cases = [
        (prometheus.url, syntax_error, "QueryFailed", prometheus_says["error"]),
        (prometheus.url, "sum(rate(no_such_metric_total[4s]))", "NoData", "no series"),
        (
            prometheus.url,
            f"sum by (finished_reason) (rate({counter}[4s]))",
            "QueryFailed",
            "returned 2 series",
        ),
        (prometheus.url, f"-sum(rate({counter}[4s]))", "InvalidValue", "cannot be negative"),
        (prometheus.url, "0/0", "InvalidValue", "is NaN"),
        (
            emitter.url,
            f"sum(rate({counter}[4s]))",
            "InvalidResponse",
            "is not Prometheus API JSON (HTTP ",
        ),
    ]
    for url, query, reason, text in cases:
        kube.merge_patch(
            Kinds.allocation,
            "chat",
            namespace,
            {
                "spec": {
                    "rateSource": {
                        "prometheus": {
                            "url": url,
                            "query": query,
                            "modelName": None,
                            "rangeSeconds": None,
                        }
                    }
                }
            },
        )
        wait_observed(kube, "chat", namespace, "False", reason, message=text)
        wait_ready(kube, "chat", namespace)  # the spec change re-solved, at the observed rate
        assert pool_versions(kube, namespace) == versions, query


@pytest.mark.parametrize("emitter", ["negotiate", "text"], indirect=True)
def test_default_query_reads_either_spelling(
    kube: Kube,
    namespace: str,
    operator: OperatorProcess,
    emitter: LoadEmitter,
    prometheus: PrometheusServer,
) -> None:
    stored = prometheus.query('{__name__=~"vllm.request_success_total"}')["data"]["result"]
    assert {s["metric"]["__name__"] for s in stored} == {emitter.metric_name}
    make_pools(kube, namespace, replicas=0)
    kube.create(rate_manifest("chat", prometheus.url), namespace)
    wait_observed(kube, "chat", namespace)
    eventually(
        lambda: (
            pytest.approx(EMITTER_RATE, rel=0.02)
            == status_of(kube, "chat", namespace)["observedRate"]
        )
    )


def test_tls_and_credentials_from_the_namespace(
    kube: Kube,
    namespace: str,
    operator: OperatorProcess,
    emitter: LoadEmitter,
    tmp_path: Path,
) -> None:
    """Prometheus over TLS with its own CA; the CA and a bearer token come from the namespace, from
    objects labelled for rate sources, and the token goes only to a URL the operator allows."""
    from kubernetes import client

    cert, key, pem = self_signed_certificate(tmp_path)
    server = PrometheusServer(tmp_path / "tls-prometheus", [emitter.address], tls=(cert, key))
    server.start()
    try:
        make_pools(kube, namespace, replicas=0)
        manifest = rate_manifest("chat", server.url)
        manifest["spec"]["rateSource"]["prometheus"].update(
            bearerTokenSecretRef={"name": "prometheus-token", "key": "token"},
            caConfigMapRef={"name": "prometheus-ca", "key": "ca.crt"},
        )
        kube.create(manifest, namespace)
        # A token goes to an in-cluster Service only, unless the operator allows the URL.
        wait_observed(
            kube,
            "chat",
            namespace,
            "False",
            "URLNotAllowed",
            message=f"{server.url} is not an in-cluster Service",
        )
        operator.stop()
        operator.extra_args = (*operator.extra_args, "--allow-prometheus-url", server.url)
        operator.start()
        wait_observed(
            kube,
            "chat",
            namespace,
            "False",
            "CredentialsUnavailable",
            message=f"Secret {namespace}/prometheus-token: not found",
        )

        core = client.CoreV1Api(kube.api_client)
        core.create_namespaced_secret(
            namespace,
            client.V1Secret(
                metadata=client.V1ObjectMeta(name="prometheus-token"),
                string_data={"token": "s3cret\n"},
            ),
        )
        wait_observed(
            kube,
            "chat",
            namespace,
            "False",
            "CredentialsUnavailable",
            message=f"Secret {namespace}/prometheus-token is not labelled {CREDENTIALS}=true",
        )
        core.patch_namespaced_secret(
            "prometheus-token", namespace, {"metadata": {"labels": {CREDENTIALS: "true"}}}
        )
        wait_observed(
            kube,
            "chat",
            namespace,
            "False",
            "CredentialsUnavailable",
            message=f"ConfigMap {namespace}/prometheus-ca: not found",
        )
        core.create_namespaced_config_map(
            namespace,
            client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name="prometheus-ca", labels={CREDENTIALS: "true"}),
                data={"ca.crt": pem},
            ),
        )
        wait_observed(kube, "chat", namespace, "True", "Observed")
        eventually(lambda: at_plan_near(kube, "chat", namespace, EMITTER_RATE))

        # Without the CA, the certificate is not trusted: TLS is verified by default.
        kube.merge_patch(
            Kinds.allocation,
            "chat",
            namespace,
            {"spec": {"rateSource": {"prometheus": {"caConfigMapRef": None}}}},
        )
        wait_observed(
            kube,
            "chat",
            namespace,
            "False",
            "PrometheusUnavailable",
            message=f"TLS certificate of 127.0.0.1:{server.port} not trusted",
        )
    finally:
        server.stop()
