"""The Grafana dashboard's queries on a real Prometheus that scrapes the operator's metrics the way
Prometheus Operator scrapes them through the chart's ServiceMonitor.

The metrics are the operator's own registry served by `metrics.serve` (what `melange run` serves),
filled through the functions the operator calls. Prometheus' scrape job is built from the rendered
ServiceMonitor as Prometheus Operator builds it: `honor_labels` from `honorLabels`, target labels
`namespace`, `service`, `pod`, `container`, `endpoint` and `job` from the Kubernetes service
discovery's meta labels (here set on a static target), then the endpoint's `relabelings`, and
`metricRelabelings` on the samples. The target's `namespace` is the operator's; the allocation's
namespace is another.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from melange import api
from melange.controller import metrics
from melange.plan import solver
from tests.e2e.prometheus import PrometheusServer, free_port

from .helm import CHART, FULLNAME, RELEASE_NAMESPACE, one, render

pytestmark = pytest.mark.e2e

DASHBOARD = CHART / "dashboards" / "melange-operator.json"
EXAMPLE = Path(__file__).parents[2] / "examples" / "mixed.yaml"
POD = f"{FULLNAME}-5d4f8b7c9-x2x7q"
SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"
RATE_INTERVAL = "30s"  # Grafana's $__rate_interval: at least 4 scrapes (1 s here)
# With honorLabels off (e.g. Prometheus' overrideHonorLabels), this puts the allocation's namespace
# back in `namespace`; docs/prometheus.md gives it.
RESTORE_NAMESPACE = [
    {
        "sourceLabels": ["exported_namespace"],
        "regex": "(.+)",
        "targetLabel": "namespace",
        "action": "replace",
    },
    {"regex": "exported_namespace", "action": "labeldrop"},
]


def _snake(key: str) -> str:
    return re.sub(r"[A-Z]", lambda m: "_" + m[0].lower(), key)


def _relabel(configs: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Prometheus Operator's RelabelConfig (camelCase) as Prometheus' relabel_config."""
    return [
        {_snake(k): (v.lower() if k == "action" else v) for k, v in config.items()}
        for config in configs or []
    ]


def scrape_job(monitor: dict[str, Any], target: str) -> dict[str, Any]:
    """The scrape job Prometheus Operator generates for the ServiceMonitor's endpoint, on `target`
    instead of a discovered endpoint (its meta labels set as the discovery would set them)."""
    (endpoint,) = monitor["spec"]["endpoints"]
    namespace = monitor["metadata"]["namespace"]
    service = f"{FULLNAME}-metrics"
    meta = {
        "__meta_kubernetes_namespace": namespace,
        "__meta_kubernetes_service_name": service,
        "__meta_kubernetes_pod_name": POD,
        "__meta_kubernetes_pod_container_name": "operator",
        "__meta_kubernetes_pod_node_name": "node-1",
        "__meta_kubernetes_endpoint_port_name": endpoint["port"],
    }
    standard = [
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
        {"target_label": "endpoint", "replacement": endpoint["port"]},
    ]
    return {
        "job_name": f"serviceMonitor/{namespace}/{monitor['metadata']['name']}/0",
        "honor_labels": bool(endpoint.get("honorLabels", False)),
        "metrics_path": endpoint["path"],
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "static_configs": [{"targets": [target], "labels": meta}],
        "relabel_configs": [*standard, *_relabel(endpoint.get("relabelings"))],
        "metric_relabel_configs": _relabel(endpoint.get("metricRelabelings")),
    }


def dashboard_queries(namespace: str, allocation: str) -> dict[str, str]:
    """Every panel target's PromQL, with the dashboard variables set to one allocation (names are
    DNS labels: nothing in them needs escaping in a regular expression)."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = {}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = (
                target["expr"]
                .replace("$namespace", namespace)
                .replace("$allocation", allocation)
                .replace("$__rate_interval", RATE_INTERVAL)
            )
            queries[f"{panel['title']} [{target.get('refId', '')}]"] = expr
    return queries


def variable_queries() -> dict[str, str]:
    """The dashboard's template variables: label_values(<metric selector>, <label>)."""
    dashboard = json.loads(DASHBOARD.read_text())
    return {
        v["name"]: v["definition"] for v in dashboard["templating"]["list"] if "definition" in v
    }


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """The operator's registry on /metrics, served by the operator's own code."""
    port = free_port()
    server, thread = metrics.serve(port, "127.0.0.1")
    yield f"127.0.0.1:{port}"
    server.shutdown()
    thread.join(timeout=5)


def record_activity(namespace: str, allocation: str, rounds: int) -> None:
    """What the operator records while it serves one allocation: solves, patches, rate queries,
    an error, the status conditions and the pools."""
    spec = api.validate_resource_spec(yaml.safe_load(EXAMPLE.read_text())["spec"])
    for round_ in range(rounds):
        plan = solver.solve_spec(spec, 30.0 + round_)
        metrics.record_plan(namespace, allocation, plan, "rate_drift" if round_ else "create")
        metrics.record_saving(namespace, allocation, plan)
        for gpu in plan.gpus:
            metrics.record_patch(namespace, allocation, gpu.name, ok=True)
        metrics.record_rate_query(namespace, allocation, "ok", 30.0 + round_)
        metrics.record_rate_query(namespace, allocation, "PrometheusUnavailable", None)
        metrics.record_rate_query(namespace, allocation, "ok", 30.0 + round_)
        metrics.record_distribution_distance(namespace, allocation, 0.05)
        metrics.record_error(namespace, allocation, "ScaleFailed")
        metrics.record_conditions(
            namespace,
            allocation,
            [{"type": "Ready", "status": "True"}, {"type": "RateObserved", "status": "True"}],
        )
        replicas = plan.replicas()
        metrics.record_pool_replicas(namespace, allocation, replicas, replicas)
    metrics.record_leader(True)
    metrics.record_build_info("0.1.0")


def series(prometheus: PrometheusServer, selector: str) -> list[dict[str, str]]:
    params = urllib.parse.urlencode({"match[]": selector})
    with urllib.request.urlopen(f"{prometheus.local_url}/api/v1/series?{params}") as response:
        return list(json.load(response)["data"])


def label_values(prometheus: PrometheusServer, definition: str, scope: dict[str, str]) -> set[str]:
    """Grafana's label_values(selector, label), with the variables it refers to set."""
    match = re.fullmatch(r"label_values\((.+), (\w+)\)", definition)
    assert match, definition
    selector = match[1]
    for name, value in scope.items():
        selector = selector.replace(f"${name}", value)
    return {s[match[2]] for s in series(prometheus, selector) if match[2] in s}


def scrape(tmp_path: Path, monitor: dict[str, Any], target: str) -> PrometheusServer:
    prometheus = PrometheusServer(tmp_path / "prometheus", [])
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [scrape_job(monitor, target)],
    }
    prometheus.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    prometheus.start()
    return prometheus


def service_monitor(**endpoint: Any) -> dict[str, Any]:
    values = {"metrics": {"serviceMonitor": {"enabled": True, **endpoint}}}
    return one(render(values, api_versions=[SERVICE_MONITOR_API]), "ServiceMonitor")


def wait_for_series(prometheus: PrometheusServer, selector: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not series(prometheus, selector):
        assert time.monotonic() < deadline, f"no series {selector}:\n{prometheus.log()}"
        time.sleep(0.2)


def results(prometheus: PrometheusServer, promql: str) -> list[dict[str, Any]]:
    answer = prometheus.query(promql)
    assert answer["status"] == "success", (promql, answer)
    return list(answer["data"]["result"])


@pytest.mark.parametrize(
    "endpoint_values",
    [{}, {"honorLabels": False, "metricRelabelings": RESTORE_NAMESPACE}],
    ids=["chart-defaults", "honor-labels-off-with-relabelings"],
)
def test_every_dashboard_query_shows_the_allocation(
    endpoint_values: dict[str, Any], endpoint: str, tmp_path: Path
) -> None:
    namespace, allocation = f"serving-{uuid.uuid4().hex[:6]}", "chat"
    monitor = service_monitor(**endpoint_values)
    assert monitor["metadata"]["namespace"] == RELEASE_NAMESPACE
    record_activity(namespace, allocation, rounds=1)
    prometheus = scrape(tmp_path, monitor, endpoint)
    try:
        selector = f'melange_plan_cost_per_hour{{namespace="{namespace}"}}'
        wait_for_series(prometheus, selector)
        # More activity after the first scrape: the counters and the histogram move in the range.
        record_activity(namespace, allocation, rounds=2)
        time.sleep(4)

        empty = {}
        for title, promql in dashboard_queries(namespace, allocation).items():
            found = results(prometheus, promql)
            values = [float(r["value"][1]) for r in found]
            if not found or not all(math.isfinite(v) for v in values):
                empty[title] = (promql, found)
        assert not empty, empty

        # The plotted numbers are the allocation's: its cost, its replicas per GPU type.
        plan = solver.solve_spec(
            api.validate_resource_spec(yaml.safe_load(EXAMPLE.read_text())["spec"]), 31.0
        )
        cost = results(prometheus, f'sum(melange_plan_cost_per_hour{{namespace="{namespace}"}})')
        assert float(cost[0]["value"][1]) == pytest.approx(plan.cost_per_hour)
        replicas = results(
            prometheus, f'sum by (gpu) (melange_plan_replicas{{namespace="{namespace}"}})'
        )
        assert {r["metric"]["gpu"]: float(r["value"][1]) for r in replicas} == {
            g.name: g.replicas for g in plan.gpus
        }

        # The dashboard's variables offer the allocation's namespace, not the operator's.
        variables = variable_queries()
        namespaces = label_values(prometheus, variables["namespace"], {})
        assert namespace in namespaces
        assert RELEASE_NAMESPACE not in namespaces
        allocations = label_values(prometheus, variables["allocation"], {"namespace": namespace})
        assert allocations == {allocation}

        # The target's labels are Prometheus Operator's; series that are not per allocation
        # carry the operator's namespace.
        (leader,) = series(prometheus, "melange_leader")
        assert leader["namespace"] == RELEASE_NAMESPACE
        assert leader["pod"] == POD
        assert leader["service"] == f"{FULLNAME}-metrics"
        (cost_series,) = series(prometheus, selector)
        assert cost_series["pod"] == POD
        assert "exported_namespace" not in cost_series
    finally:
        prometheus.stop()


def test_without_honor_labels_the_dashboard_loses_the_allocation(
    endpoint: str, tmp_path: Path
) -> None:
    """What honorLabels (the chart's default) prevents: Prometheus renames the allocation's
    namespace to exported_namespace and puts the operator's in namespace."""
    namespace, allocation = f"serving-{uuid.uuid4().hex[:6]}", "chat"
    record_activity(namespace, allocation, rounds=1)
    prometheus = scrape(tmp_path, service_monitor(honorLabels=False), endpoint)
    try:
        wait_for_series(
            prometheus, f'melange_plan_cost_per_hour{{exported_namespace="{namespace}"}}'
        )
        cost = dashboard_queries(namespace, allocation)["Cost per hour by allocation [A]"]
        assert results(prometheus, cost) == []
        (found,) = series(
            prometheus, f'melange_plan_cost_per_hour{{exported_namespace="{namespace}"}}'
        )
        assert found["namespace"] == RELEASE_NAMESPACE
    finally:
        prometheus.stop()
