"""`melange status`'s formatting, on status dicts (no cluster): the document `-o json|yaml`
prints, the table, and the exit codes around the one function that reads the API server."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from click.testing import CliRunner

from melange.cli import main
from melange.cli.status import human_duration, render_table, status_report
from tests.unit.test_cli import KUBERNETES_AND_HTTP, imported, packages

NOW = datetime(2026, 12, 1, 9, 0, 0, tzinfo=UTC)


def ref(kind: str, name: str) -> dict[str, str]:
    return {"apiVersion": "example/v1", "kind": kind, "name": name}


# A status with every optional field the operator writes: a rate source, a transition under way
# with a capped type, live prices, the saving, and a spec changed since it was reconciled.
FULL: dict[str, Any] = {
    "apiVersion": "melange.dev/v1alpha1",
    "kind": "MelangeAllocation",
    "metadata": {
        "name": "llama-mixed",
        "namespace": "serving",
        "generation": 4,
        "creationTimestamp": "2026-11-30T09:00:00Z",
        "uid": "u-1",
    },
    "spec": {
        "gpus": [
            {"name": "L4", "scaleTargetRef": ref("Deployment", "pool-l4")},
            {"name": "L40S", "scaleTargetRef": ref("MachineDeployment", "pool-l40s")},
            {"name": "H100", "scaleTargetRef": ref("NodePool", "h100")},
        ]
    },
    "status": {
        "observedGeneration": 3,
        "planStatus": "Feasible",
        "costPerHour": 10.65,
        "lowerBound": 10.2,
        "totalReplicas": 6,
        "gpuTypes": 2,
        "savingPerHour": 0.51,
        "singleTypeBaseline": {"name": "L40S", "replicas": 6, "costPerHour": 11.16},
        "inputRoutingError": 0.0471,
        "routingConfigMap": "llama-mixed-routing",
        "solvedRate": 30.0,
        "observedRate": 31.25,
        "lastObservationTime": "2026-12-01T08:59:30Z",
        "lastSolveTime": "2026-12-01T08:55:00Z",
        "solveSeconds": 0.0381,
        "gpus": [
            {"name": "L4", "replicas": 2, "costPerHour": 1.4, "utilization": 0.71},
            {"name": "L40S", "replicas": 4, "costPerHour": 7.44, "utilization": 0.82},
            {"name": "H100", "replicas": 0, "costPerHour": 0.0, "utilization": 0.0},
        ],
        "targets": [
            {
                "name": "L4",
                "target": "Deployment/pool-l4",
                "policy": "Enforce",
                "desiredReplicas": 2,
                "observedReplicas": 2,
                "plannedReplicas": 2,
                "readyReplicas": 2,
                "lastScaleTime": "2026-12-01T08:55:00Z",
            },
            {
                "name": "L40S",
                "target": "MachineDeployment/pool-l40s",
                "policy": "Observe",
                "desiredReplicas": 4,
                "observedReplicas": 3,
                "plannedReplicas": 5,
                "readyReplicas": 1,
                "shortSince": "2026-12-01T08:50:00Z",
                "lastScaleTime": "2026-12-01T08:50:00Z",
            },
            {
                "name": "H100",
                "target": "NodePool/h100",
                "policy": "Enforce",
                "desiredReplicas": 0,
                "observedReplicas": 0,
            },
        ],
        "prices": [
            {"name": "L4", "costPerHour": 0.7, "source": "spec"},
            {
                "name": "L40S",
                "costPerHour": 1.86,
                "source": "ConfigMap serving/gpu-prices key l40s",
                "time": "2026-12-01T08:58:00Z",
            },
        ],
        "transitionSince": "2026-12-01T08:50:00Z",
        "gpuCaps": [
            {
                "name": "L40S",
                "replicas": 4,
                "since": "2026-12-01T08:55:00Z",
                "retryTime": "2026-12-01T09:25:00Z",
            }
        ],
        "recentPatches": [  # newest first, as the operator stores them
            {
                "time": "2026-12-01T08:55:00Z",
                "name": "L4",
                "target": "Deployment/pool-l4",
                "from": 1,
                "to": 2,
                "reason": "CapacityShort",
            },
            {
                "time": "2026-12-01T08:50:00Z",
                "name": "L4",
                "target": "Deployment/pool-l4",
                "from": 3,
                "to": 1,
                "reason": "RateDrift",
            },
            {
                "time": "2026-12-01T08:50:00Z",
                "name": "L40S",
                "target": "MachineDeployment/pool-l40s",
                "from": 3,
                "to": 4,
                "reason": "RateDrift",
            },
            {
                "time": "2026-11-30T09:00:05Z",
                "name": "L4",
                "target": "Deployment/pool-l4",
                "from": 0,
                "to": 3,
                "reason": "Create",
            },
        ],
        "conditions": [
            {
                "type": "Ready",
                "status": "False",
                "reason": "Transitioning",
                "observedGeneration": 3,
                "lastTransitionTime": "2026-12-01T08:50:00Z",
                "message": "waiting for L40S: 1 of 5 ready",
            },
            {
                "type": "Solved",
                "status": "True",
                "reason": "Feasible",
                "observedGeneration": 3,
                "lastTransitionTime": "2026-11-30T09:00:05Z",
                "message": "feasible: 10.65/h for 30 req/s (lower bound 10.20/h, gap 4.2%)",
            },
            {
                "type": "RateObserved",
                "status": "True",
                "reason": "Observed",
                "observedGeneration": 3,
                "lastTransitionTime": "2026-11-30T09:00:30Z",
                # a message on two lines, with a terminal escape: the table shows it on one
                "message": "31.25 req/s from\nhttp://prometheus:9090\x1b[31m",
            },
        ],
    },
}


def event(
    index: int,
    reason: str,
    message: str,
    when: str,
    type_: str = "Normal",
    count: int | None = None,
    first: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"name": f"melange-{index}", "resourceVersion": str(100 + index)},
        "type": type_,
        "reason": reason,
        "message": message,
        "firstTimestamp": first or when,
        "lastTimestamp": when,
    }
    if count is not None:
        body["count"] = count
    return body


# 14 Events, listed in no particular order (as the API server lists them by name)
EVENTS = [
    event(21, "CapacityShort", "L40S capped at 4", "2026-12-01T08:55:00Z", "Warning", 3,
          "2026-12-01T08:45:00Z"),
    event(20, "Scaled", "Deployment/pool-l4 (L4): 1 -> 2 (CapacityShort)", "2026-12-01T08:55:00Z"),
    *(event(i, "RateDrift", f"rate drift {i}", f"2026-12-01T08:{i:02d}:00Z") for i in range(12)),
]  # fmt: skip

FULL_TABLE = """\
Name:       llama-mixed
Namespace:  serving
Created:    2026-11-30T09:00:00Z (24h ago)
Ready:      False, Transitioning: waiting for L40S: 1 of 5 ready (for 10m)
Generation: 4, observed 3: the status is stale (the latest spec is not reconciled yet)

Plan:
  Status:           Feasible
  Cost:             10.65/h
  Lower bound:      10.20/h (no plan costs less; gap 4.2%)
  Instances:        6 of 2 GPU types
  Solved rate:      30 req/s
  Observed rate:    31.25 req/s (30s ago)
  Best single type: L40S x6 at 11.16/h; saving 0.51/h (4.6%)
  Routing:          by input length 4.7% off the planned loads; table in ConfigMap llama-mixed-routing
  Last solve:       2026-12-01T08:55:00Z (5m ago), took 0.038 s
  Prices:
    GPU   COST/H  SOURCE                                 READ
    L4      0.70  spec                                   -
    L40S    1.86  ConfigMap serving/gpu-prices key l40s  2m ago

Pools:
  GPU   TARGET                       POLICY   PLANNED  ASKED  OBSERVED  READY  LAST SCALE
  L4    Deployment/pool-l4           Enforce        2      2         2      2  5m ago
  L40S  MachineDeployment/pool-l40s  Observe        5      4         3      1  10m ago
  H100  NodePool/h100                Enforce        0      0         0      -  -
  L40S: short of its asked count since 2026-12-01T08:50:00Z (10m ago)
  Capacity caps:
    L40S: at most 4 since 2026-12-01T08:55:00Z (5m ago); asked for its full count again at 2026-12-01T09:25:00Z (in 25m)
  Transition under way since 2026-12-01T08:50:00Z (10m ago)

Last decisions (newest last):
  WHEN     GPU   TARGET                       REPLICAS  REASON
  23h ago  L4    Deployment/pool-l4           0 -> 3    Create
  10m ago  L4    Deployment/pool-l4           3 -> 1    RateDrift
  10m ago  L40S  MachineDeployment/pool-l40s  3 -> 4    RateDrift
  5m ago   L4    Deployment/pool-l4           1 -> 2    CapacityShort

Conditions:
  TYPE          STATUS  REASON         AGE  MESSAGE
  Ready         False   Transitioning  10m  waiting for L40S: 1 of 5 ready
  Solved        True    Feasible       23h  feasible: 10.65/h for 30 req/s (lower bound 10.20/h, gap 4.2%)
  RateObserved  True    Observed       23h  31.25 req/s from http://prometheus:9090\\x1b[31m

Events (newest last):
  TYPE     REASON         AGE               MESSAGE
  Normal   RateDrift      56m               rate drift 4
  Normal   RateDrift      55m               rate drift 5
  Normal   RateDrift      54m               rate drift 6
  Normal   RateDrift      53m               rate drift 7
  Normal   RateDrift      52m               rate drift 8
  Normal   RateDrift      51m               rate drift 9
  Normal   RateDrift      50m               rate drift 10
  Normal   RateDrift      49m               rate drift 11
  Normal   Scaled         5m                Deployment/pool-l4 (L4): 1 -> 2 (CapacityShort)
  Warning  CapacityShort  5m (x3 over 15m)  L40S capped at 4
"""

# Just created: the API server has given it a generation, no operator has written a status.
NEW: dict[str, Any] = {
    "apiVersion": "melange.dev/v1alpha1",
    "kind": "MelangeAllocation",
    "metadata": {
        "name": "chat",
        "namespace": "default",
        "generation": 1,
        "creationTimestamp": "2026-12-01T08:59:58Z",
    },
    "spec": {"gpus": [{"name": "A", "scaleTargetRef": ref("Deployment", "pool-a")}]},
}

NEW_TABLE = """\
Name:       chat
Namespace:  default
Created:    2026-12-01T08:59:58Z (2s ago)
Ready:      Unknown (no Ready condition yet)
Generation: 1, not observed yet: no status from the operator (is `melange run` watching namespace default?)

Plan:
  none yet: the operator has not solved this allocation

Pools:
  GPU  TARGET             POLICY  PLANNED  ASKED  OBSERVED  READY  LAST SCALE
  A    Deployment/pool-a  -             -      -         -      -  -

Last decisions (newest last):
  none

Conditions:
  none yet

Events (newest last):
  none
"""


def test_every_optional_field_is_in_the_document() -> None:
    report = status_report(FULL, EVENTS)
    assert json.loads(json.dumps(report)) == report  # plain JSON data
    assert (report["name"], report["namespace"]) == ("llama-mixed", "serving")
    assert (report["generation"], report["observedGeneration"], report["stale"]) == (4, 3, True)
    assert report["ready"] == report["conditions"][0]
    assert report["plan"] == {
        "status": "Feasible",
        "costPerHour": 10.65,
        "lowerBound": 10.2,
        "gap": 0.042254,
        "totalReplicas": 6,
        "gpuTypes": 2,
        "solvedRate": 30.0,
        "observedRate": 31.25,
        "lastObservationTime": "2026-12-01T08:59:30Z",
        "lastSolveTime": "2026-12-01T08:55:00Z",
        "solveSeconds": 0.0381,
        "savingPerHour": 0.51,
        "singleTypeBaseline": {"name": "L40S", "replicas": 6, "costPerHour": 11.16},
        "inputRoutingError": 0.0471,
        "routingConfigMap": "llama-mixed-routing",
        "prices": [
            {"name": "L4", "costPerHour": 0.7, "source": "spec", "time": None},
            {
                "name": "L40S",
                "costPerHour": 1.86,
                "source": "ConfigMap serving/gpu-prices key l40s",
                "time": "2026-12-01T08:58:00Z",
            },
        ],
    }
    assert report["pools"][1] == {
        "name": "L40S",
        "target": "MachineDeployment/pool-l40s",
        "policy": "Observe",
        "planned": 5,  # plannedReplicas, not gpus[].replicas (the capped plan's 4)
        "asked": 4,
        "observed": 3,
        "ready": 1,
        "costPerHour": 7.44,
        "utilization": 0.82,
        "shortSince": "2026-12-01T08:50:00Z",
        "lastScaleTime": "2026-12-01T08:50:00Z",
        "cap": {
            "replicas": 4,
            "since": "2026-12-01T08:55:00Z",
            "retryTime": "2026-12-01T09:25:00Z",
        },
    }
    assert report["transitionSince"] == "2026-12-01T08:50:00Z"
    # oldest first; the two patches of one reconcile keep the order they were made in
    assert [(p["name"], p["reason"]) for p in report["recentPatches"]] == [
        ("L4", "Create"),
        ("L4", "RateDrift"),
        ("L40S", "RateDrift"),
        ("L4", "CapacityShort"),
    ]
    assert report["conditions"][2]["message"] == FULL["status"]["conditions"][2]["message"]
    # the newest 10, oldest first; of the same second, by resourceVersion
    assert [e["message"] for e in report["events"]] == [
        *(f"rate drift {i}" for i in range(4, 12)),
        "Deployment/pool-l4 (L4): 1 -> 2 (CapacityShort)",
        "L40S capped at 4",
    ]
    assert report["events"][-1] == {
        "type": "Warning",
        "reason": "CapacityShort",
        "message": "L40S capped at 4",
        "count": 3,
        "firstTimestamp": "2026-12-01T08:45:00Z",
        "lastTimestamp": "2026-12-01T08:55:00Z",
    }


def test_every_optional_field_is_in_the_table() -> None:
    assert render_table(status_report(FULL, EVENTS), NOW) == FULL_TABLE


def test_a_just_created_allocation_has_the_same_keys_all_null() -> None:
    report = status_report(NEW, [])
    full = status_report(FULL, EVENTS)
    assert list(report) == list(full)
    assert list(report["plan"]) == list(full["plan"])
    assert list(report["pools"][0]) == list(full["pools"][0])
    assert report["stale"] is True
    assert report["observedGeneration"] is None
    assert report["ready"] is None
    assert report["plan"] == {**dict.fromkeys(full["plan"]), "prices": []}
    assert report["pools"] == [
        {**dict.fromkeys(full["pools"][0]), "name": "A", "target": "Deployment/pool-a"}
    ]
    assert (report["recentPatches"], report["conditions"], report["events"]) == ([], [], [])
    assert report["transitionSince"] is None


def test_a_just_created_allocation_says_so_in_the_table() -> None:
    assert render_table(status_report(NEW, []), NOW) == NEW_TABLE


def test_a_current_status_says_so() -> None:
    allocation = copy.deepcopy(FULL)
    allocation["metadata"]["generation"] = 3
    report = status_report(allocation, [])
    assert report["stale"] is False
    assert "Generation: 3, observed 3 (the status is current)\n" in render_table(report, NOW)


def test_events_that_cannot_be_listed_are_null_not_empty() -> None:
    report = status_report(NEW, None)
    assert report["events"] is None
    assert render_table(report, NOW).endswith("Events (newest last):\n  cannot be listed\n")


def test_a_spec_the_operator_refused_has_no_plan_and_says_where_to_look() -> None:
    allocation = {
        **NEW,
        "status": {
            "observedGeneration": 1,
            "conditions": [
                {"type": "Solved", "status": "False", "reason": "InvalidSpec", "message": "x"}
            ],
        },
    }
    table = render_table(status_report(allocation, []), NOW)
    assert "Plan:\n  none: InvalidSpec (the Solved condition says why)\n" in table


def test_a_malformed_status_is_shown_not_a_traceback() -> None:
    allocation = {
        "metadata": {"name": "odd", "generation": "1"},
        "spec": {"gpus": "none"},
        "status": {
            "planStatus": "Optimal",
            "costPerHour": "cheap",
            "targets": [{"name": "A", "desiredReplicas": "2"}, "junk", {"no": "name"}],
            "recentPatches": {"not": "a list"},
            "conditions": [{"type": "Ready", "status": True}],
            "gpuCaps": [{"name": "A", "replicas": None}],
            "singleTypeBaseline": "L4",
            "lastSolveTime": "yesterday",
        },
    }
    report = status_report(allocation, [{"reason": "X", "lastTimestamp": 5}, "junk"])  # type: ignore[list-item]
    assert report["plan"]["costPerHour"] is None
    assert report["pools"][0]["asked"] is None
    assert report["ready"] is not None
    assert report["ready"]["status"] is None
    table = render_table(report, NOW)
    assert "Last solve:       yesterday\n" in table
    assert "Namespace:  ?\n" in table


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (-5, "<invalid>"),
        (-0.5, "0s"),
        (0, "0s"),
        (119, "119s"),
        (120, "2m"),
        (192, "3m12s"),
        (600, "10m"),
        (179 * 60, "179m"),
        (3 * 3600, "3h"),
        (5 * 3600 + 20 * 60, "5h20m"),
        (8 * 3600 + 59 * 60, "8h"),
        (47 * 3600, "47h"),
        (3 * 86400 + 4 * 3600, "3d4h"),
        (8 * 86400, "8d"),
        (400 * 86400, "400d"),
        (2 * 365 * 86400 + 30 * 86400, "2y30d"),
        (9 * 365 * 86400, "9y"),
    ],
)
def test_ages_read_as_kubectl_prints_them(seconds: float, shown: str) -> None:
    assert human_duration(seconds) == shown


# -- the command around the reading, with the reading replaced --------------------------------


@pytest.fixture
def reading(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str | None]]:
    """`read_allocation` answering FULL and its Events; the calls it got."""
    from melange.controller.kube import inspect

    calls: list[tuple[str, str, str | None]] = []

    def read(name: str, namespace: str, kubeconfig: str | None = None) -> inspect.Inspection:
        calls.append((name, namespace, kubeconfig))
        return inspect.Inspection(copy.deepcopy(FULL), copy.deepcopy(EVENTS))

    monkeypatch.setattr(inspect, "read_allocation", read)
    monkeypatch.setattr(inspect, "default_namespace", lambda kubeconfig: "from-context")
    return calls


def test_json_and_yaml_print_the_document(reading: list[Any]) -> None:
    import yaml

    runner = CliRunner()
    as_json = runner.invoke(main, ["status", "llama-mixed", "-o", "json"])
    as_yaml = runner.invoke(main, ["status", "llama-mixed", "-n", "serving", "-o", "yaml"])
    assert as_json.exit_code == as_yaml.exit_code == 0
    assert json.loads(as_json.stdout) == yaml.safe_load(as_yaml.stdout)
    assert json.loads(as_json.stdout) == status_report(FULL, EVENTS)
    # the namespace: -n, else the kubeconfig context's
    assert reading == [
        ("llama-mixed", "from-context", None),
        ("llama-mixed", "serving", None),
    ]


def test_the_table_is_the_default(reading: list[Any]) -> None:
    result = CliRunner().invoke(main, ["status", "llama-mixed", "--kubeconfig", "k.yaml"])
    assert result.exit_code == 0
    assert result.stdout.startswith("Name:       llama-mixed\nNamespace:  serving\n")
    assert reading == [("llama-mixed", "from-context", "k.yaml")]


def test_not_found_is_exit_1_and_a_server_problem_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    from melange.controller.kube import inspect

    def missing(name: str, namespace: str, kubeconfig: str | None = None) -> inspect.Inspection:
        raise inspect.AllocationNotFound(f"MelangeAllocation {namespace}/{name} not found")

    def unreachable(name: str, namespace: str, kubeconfig: str | None = None) -> inspect.Inspection:
        raise inspect.InspectError("cannot reach the API server https://x:6443: connection refused")

    runner = CliRunner()
    monkeypatch.setattr(inspect, "read_allocation", missing)
    result = runner.invoke(main, ["status", "chat", "-n", "prod"])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == "error: MelangeAllocation prod/chat not found\n"
    monkeypatch.setattr(inspect, "read_allocation", unreachable)
    result = runner.invoke(main, ["status", "chat", "-n", "prod"])
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        "error: cannot reach the API server https://x:6443: connection refused\n"
    )


def test_events_that_cannot_be_listed_are_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    from melange.controller.kube import inspect

    def read(name: str, namespace: str, kubeconfig: str | None = None) -> inspect.Inspection:
        return inspect.Inspection(
            copy.deepcopy(NEW), None, "the Events cannot be listed: forbidden"
        )

    monkeypatch.setattr(inspect, "read_allocation", read)
    result = CliRunner().invoke(main, ["status", "chat", "-n", "default", "-o", "json"])
    assert result.exit_code == 0
    assert result.stderr == "warning: the Events cannot be listed: forbidden\n"
    assert json.loads(result.stdout)["events"] is None


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["Chat"], "error: NAME 'Chat': not a valid object name (lower-case DNS subdomain)"),
        (["a/b"], "error: NAME 'a/b': not a valid object name (lower-case DNS subdomain)"),
        (
            ["chat", "-n", "a.b"],
            "error: --namespace 'a.b': not a valid namespace (lower-case DNS label)",
        ),
    ],
)
def test_a_bad_name_or_namespace_is_exit_2_before_any_request(
    reading: list[Any], args: list[str], error: str
) -> None:
    result = CliRunner().invoke(main, ["status", *args])
    assert (result.exit_code, result.stderr) == (2, error + "\n")
    assert reading == []


def test_help_loads_no_kubernetes_client() -> None:
    modules = imported("status", "--help")
    assert "melange.cli.status" in modules
    assert not packages(modules) & KUBERNETES_AND_HTTP


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (
            404,
            {"reason": "NotFound", "details": {"name": "chat", "kind": "melangeallocations"}},
            "MelangeAllocation prod/chat not found",
        ),
        (
            404,
            {"reason": "NotFound", "details": {}},
            "SERVER does not serve melange.dev/v1alpha1: install the CRD first",
        ),
        (
            403,
            {"message": 'melangeallocations.melange.dev "chat" is forbidden: User "u" cannot get'},
            "SERVER refused to show prod/chat (403 Forbidden): melangeallocations.melange.dev "
            '"chat" is forbidden: User "u" cannot get',
        ),
        (
            401,
            {"message": "Unauthorized"},
            "SERVER rejected the credentials (401 Unauthorized): Unauthorized",
        ),
        (
            500,
            {"message": "etcdserver: request timed out"},
            "SERVER answered 500: etcdserver: request timed out",
        ),
    ],
)
def test_each_answer_of_the_server_is_told_apart(
    status: int, body: dict[str, Any], message: str
) -> None:
    from kubernetes.client.exceptions import ApiException

    from melange.controller.kube import inspect

    exc = ApiException(status=status, reason="x", body=json.dumps(body))
    error = inspect._refused(exc, "SERVER", "chat", "prod")
    expected = inspect.AllocationNotFound if "not found" in message else inspect.InspectError
    assert type(error) is expected
    assert str(error) == message
