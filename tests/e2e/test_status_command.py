"""`melange status` against the real API server, with the operator reconciling the allocation.

Two Deployments as node pools: A (1.0/h, 10 req/s each) and B (3.0/h, 40 req/s each). At 45 req/s
the cheapest plan runs one of each, so both pools are patched (two `Scaled` Events).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.controlplane.harness import ControlPlane

from .kube import Kube, eventually, reasons
from .operator_process import MELANGE, OperatorProcess

pytestmark = pytest.mark.e2e

NAME = "chat"


def allocation() -> dict[str, Any]:
    def gpu(name: str, cost: float, throughput: float, pool: str) -> dict[str, Any]:
        return {
            "name": name,
            "costPerHour": cost,
            "throughput": [[throughput]],
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": pool},
        }

    return {
        "apiVersion": "melange.dev/v1alpha1",
        "kind": "MelangeAllocation",
        "metadata": {"name": NAME},
        "spec": {
            "buckets": {"inputTokens": [1, 100], "outputTokens": [1, 100]},
            "workload": {"distribution": [[1]], "totalRate": 45},
            "sliceFactor": 8,
            "gpus": [gpu("A", 1.0, 10.0, "pool-a"), gpu("B", 3.0, 40.0, "pool-b")],
        },
    }


def melange_status(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    return subprocess.run(
        [MELANGE, "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        check=False,
    )


@pytest.fixture
def reconciled(kube: Kube, namespace: str, operator: OperatorProcess) -> dict[str, Any]:
    """The allocation once Ready, with both pools scaled and their Events posted."""
    kube.deployment("pool-a", namespace)
    kube.deployment("pool-b", namespace)
    kube.create(allocation(), namespace)
    kube.wait_condition(NAME, namespace, "Ready", "True")

    def scaled_twice() -> None:
        assert reasons(kube.events(namespace, NAME)).count("Scaled") == 2

    eventually(scaled_twice, timeout=30)
    return kube.allocation(NAME, namespace)


def test_the_table_names_the_plan_the_pools_the_events_and_the_conditions(
    control_plane: ControlPlane, namespace: str, reconciled: dict[str, Any]
) -> None:
    status = reconciled["status"]
    kubeconfig = str(control_plane.kubeconfig_path)
    result = melange_status(NAME, "-n", namespace, "--kubeconfig", kubeconfig)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    print(out)
    lines = out.splitlines()
    assert f"Name:       {NAME}" in lines
    assert f"Namespace:  {namespace}" in lines
    assert any(line.startswith("Ready:      True, Reconciled") for line in lines), out
    assert "(the status is current)" in out
    assert f"  Status:           {status['planStatus']}" in lines
    assert f"  Cost:             {status['costPerHour']:.2f}/h" in lines
    assert (
        f"  Instances:        {status['totalReplicas']} of {status['gpuTypes']} GPU types" in lines
    )
    counts = {g["name"]: g["replicas"] for g in status["gpus"]}
    assert counts == {"A": 1, "B": 1}
    pool_rows = {line.split()[0]: line.split() for line in lines if "Deployment/pool-" in line}
    for gpu, pool in (("A", "pool-a"), ("B", "pool-b")):
        target = next(t for t in status["targets"] if t["name"] == gpu)
        row = pool_rows[gpu]
        # GPU, TARGET, POLICY, PLANNED, ASKED, OBSERVED, READY, LAST SCALE
        assert row[1:7] == [
            f"Deployment/{pool}",
            "Enforce",
            str(counts[gpu]),
            str(target["desiredReplicas"]),
            str(target["observedReplicas"]),
            "-",
        ], row
    if status.get("savingPerHour") is not None:
        assert f"saving {status['savingPerHour']:.2f}/h" in out
    # the last decisions, oldest first: each pool patched from 0 at creation, in the spec's order
    decisions = section(out, "Last decisions (newest last):")
    assert [line.split()[2:] for line in decisions[1:]] == [
        ["A", "Deployment/pool-a", "0", "->", "1", "Create"],
        ["B", "Deployment/pool-b", "0", "->", "1", "Create"],
    ], decisions
    # every condition, with its status and reason
    for condition in status["conditions"]:
        assert any(
            line.split()[:3] == [condition["type"], condition["status"], condition["reason"]]
            for line in lines
        ), (condition, out)
    # the Events: both patches, by their message
    events = section(out, "Events (newest last):")
    assert events[0].split() == ["TYPE", "REASON", "AGE", "MESSAGE"]
    scaled = [line.split(None, 3) for line in events if " Scaled " in line]
    assert sorted((row[0], row[3]) for row in scaled) == [
        ("Normal", "Deployment/pool-a (A): 0 -> 1 (Create)"),
        ("Normal", "Deployment/pool-b (B): 0 -> 1 (Create)"),
    ], events


def section(out: str, title: str) -> list[str]:
    """The lines under `title`, up to the next blank line."""
    return out.split(f"\n{title}\n", 1)[1].split("\n\n", 1)[0].splitlines()


def test_json_is_the_status_in_the_documented_shape(
    control_plane: ControlPlane, namespace: str, reconciled: dict[str, Any], tmp_path: Path
) -> None:
    # no -n and no --kubeconfig: KUBECONFIG, and the namespace of its current context
    config = yaml.safe_load(control_plane.kubeconfig_path.read_text())
    current = config["current-context"]
    for context in config["contexts"]:
        if context["name"] == current:
            context["context"]["namespace"] = namespace
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    result = melange_status(NAME, "-o", "json", env={"KUBECONFIG": str(kubeconfig)})
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    status = reconciled["status"]
    assert list(document) == [
        "name",
        "namespace",
        "creationTimestamp",
        "generation",
        "observedGeneration",
        "stale",
        "ready",
        "plan",
        "pools",
        "transitionSince",
        "recentPatches",
        "conditions",
        "events",
    ]
    assert (document["name"], document["namespace"]) == (NAME, namespace)
    assert document["generation"] == reconciled["metadata"]["generation"]
    assert document["observedGeneration"] == status["observedGeneration"]
    assert document["stale"] is False
    plan = document["plan"]
    assert plan["status"] == status["planStatus"]
    assert plan["costPerHour"] == status["costPerHour"]
    assert plan["lowerBound"] == status["lowerBound"]
    assert plan["solvedRate"] == status["solvedRate"] == 45
    assert plan["totalReplicas"] == status["totalReplicas"] == 2
    assert plan["observedRate"] is None
    assert plan["savingPerHour"] == status.get("savingPerHour")
    assert plan["singleTypeBaseline"] == status.get("singleTypeBaseline")
    targets = {t["name"]: t for t in status["targets"]}
    assert [p["name"] for p in document["pools"]] == ["A", "B"]
    for pool in document["pools"]:
        target = targets[pool["name"]]
        assert pool["target"] == target["target"]
        assert pool["policy"] == target["policy"]
        assert pool["asked"] == target["desiredReplicas"] == 1
        assert pool["observed"] == target["observedReplicas"] == 1
        assert pool["planned"] == 1
    # oldest first; the patches of one reconcile in the order they were made
    assert document["recentPatches"] == sorted(status["recentPatches"], key=lambda p: p["time"])
    assert [
        (c["type"], c["status"], c["reason"], c["message"]) for c in document["conditions"]
    ] == [(c["type"], c["status"], c["reason"], c["message"]) for c in status["conditions"]]
    assert document["ready"] == next(c for c in document["conditions"] if c["type"] == "Ready")
    scaled = [e for e in document["events"] if e["reason"] == "Scaled"]
    assert sorted(e["message"] for e in scaled) == [
        "Deployment/pool-a (A): 0 -> 1 (Create)",
        "Deployment/pool-b (B): 0 -> 1 (Create)",
    ]
    assert (
        yaml.safe_load(
            melange_status(NAME, "-o", "yaml", env={"KUBECONFIG": str(kubeconfig)}).stdout
        )
        == document
    )


def test_a_just_created_allocation_says_it_has_no_status_yet(
    control_plane: ControlPlane, kube: Kube, namespace: str
) -> None:
    kube.create(allocation(), namespace)  # no operator watches this namespace
    result = melange_status(
        NAME, "-n", namespace, "--kubeconfig", str(control_plane.kubeconfig_path)
    )
    assert result.returncode == 0, result.stderr
    assert "Ready:      Unknown (no Ready condition yet)" in result.stdout
    assert f"is `melange run` watching namespace {namespace}?" in result.stdout
    assert "Deployment/pool-a" in result.stdout  # the pools, from the spec


def test_a_missing_allocation_is_one_error_and_exit_1(
    control_plane: ControlPlane, namespace: str
) -> None:
    result = melange_status(
        "nope", "-n", namespace, "--kubeconfig", str(control_plane.kubeconfig_path)
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"error: MelangeAllocation {namespace}/nope not found\n"


def test_a_server_that_cannot_be_reached_is_one_error_and_exit_2(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    config = yaml.safe_load(control_plane.kubeconfig_path.read_text())
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for cluster in config["clusters"]:
        cluster["cluster"]["server"] = f"https://127.0.0.1:{port}"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    result = melange_status(NAME, "--kubeconfig", str(kubeconfig))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"error: cannot reach the API server https://127.0.0.1:{port} "
        f"(kubeconfig {kubeconfig}): connection refused\n"
    )
