"""The README's next step on a bare cluster: the examples, applied as shipped (pools included),
side by side in one namespace, each reach Ready=True, and `kubectl get mla` shows the plan and the
rate source's state."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from melange import api
from melange.plan import solver

from .kube import REPO, Kinds, Kube, eventually
from .operator_process import OperatorProcess

EXAMPLES = REPO / "examples"


def _allocation(path: str) -> dict[str, Any]:
    return dict(yaml.safe_load((EXAMPLES / path).read_text()))


def _row(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    table = kube.table(namespace)
    columns = [c["name"] for c in table["columnDefinitions"]]
    row = next(r for r in table["rows"] if r["cells"][0] == name)
    return dict(zip(columns, row["cells"], strict=True))


def test_examples_apply_to_a_bare_cluster_and_show_their_state(
    kube: Kube, namespace: str, operator: OperatorProcess
) -> None:
    # kubectl apply -n NAMESPACE -f examples/pools/mixed.yaml -f examples/mixed.yaml, and so on
    for name in ("mixed", "conversational"):
        for pool in yaml.safe_load_all((EXAMPLES / "pools" / f"{name}.yaml").read_text()):
            kube.apply(pool, namespace)
        kube.create(_allocation(f"{name}.yaml"), namespace)
    # a Cluster API variant next to them; its MachineDeployments are the user's own
    document = _allocation("cluster-api/document.yaml")
    for gpu in document["spec"]["gpus"]:
        kube.machine_deployment(gpu["scaleTargetRef"]["name"], namespace)
    kube.create(document, namespace)

    for allocation in ("llama-mixed", "llama-conversational", "llama-document"):
        kube.wait_condition(allocation, namespace, "Ready", "True", "Reconciled")

    mixed = _allocation("mixed.yaml")
    plan = solver.solve_spec(api.parse_document(mixed).spec)
    for gpu in mixed["spec"]["gpus"]:
        pool = gpu["scaleTargetRef"]["name"]
        assert kube.replicas(Kinds.deployment, pool, namespace) == plan.replicas()[gpu["name"]]
    status = kube.allocation("llama-mixed", namespace)["status"]
    assert sorted(status)[0] == "conditions"  # `kubectl describe` prints them first
    assert status["gpuTypes"] == sum(1 for g in plan.gpus if g.replicas > 0) >= 2
    row = _row(kube, namespace, "llama-mixed")
    del row["Age"]
    assert row == {
        "Name": "llama-mixed",
        "Ready": "True",
        "Reason": "Reconciled",
        "Rate Source": None,  # blank: no rate source
        "Cost/h": pytest.approx(plan.cost_per_hour),
        "GPU Types": status["gpuTypes"],
        "Instances": sum(g.replicas for g in plan.gpus),
        "Rate": 30,
    }

    # a rate source that does not answer: the pools stay at the plan (Ready), and the column says so
    kube.merge_patch(
        Kinds.allocation,
        "llama-mixed",
        namespace,
        {
            "spec": {
                "rateSource": {
                    "prometheus": {"url": "http://127.0.0.1:1", "modelName": "llama-3.1-8b"},
                    "intervalSeconds": 5,
                }
            }
        },
    )
    kube.wait_condition("llama-mixed", namespace, "RateObserved", "False", "PrometheusUnavailable")

    def shows_the_rate_source() -> None:
        row = _row(kube, namespace, "llama-mixed")
        assert (row["Ready"], row["Rate Source"]) == ("True", "PrometheusUnavailable"), row

    eventually(shows_the_rate_source)
