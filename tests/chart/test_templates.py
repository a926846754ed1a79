"""The chart as rendered by the real helm: lint, every documented option, the values schema.

`helm template` output is parsed and checked object by object (the pytest stand-in for
helm-unittest). RBAC rules are compared as whole lists: a rule too many is as wrong as one missing.
"""

from __future__ import annotations

import json
import re
import tarfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from melange.controller import metrics

from .expected import BASE_RULES, DEFAULT_RULES, LABELS, SELECTOR, leader_args, lease_rules
from .helm import (
    CHART,
    FULLNAME,
    RELEASE,
    RELEASE_NAMESPACE,
    REPO,
    HelmError,
    Manifest,
    find,
    helm,
    kinds,
    one,
    render,
)

SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"
EXTENSIONS = Path(__file__).parent / "data" / "values-extensions.yaml"
ROUTER_VALUES = Path(__file__).parent / "data" / "values-router.yaml"
CRD_NAME = "melangeallocations.melange.dev"
VIEW, EDIT = f"{FULLNAME}-view", f"{FULLNAME}-edit"
LEADER_ELECTION = f"{FULLNAME}-leader-election"
CLUSTER_SCOPED = f"{FULLNAME}-cluster-scoped-targets"
TAIL_ARGS = ["--liveness=http://0.0.0.0:8080/healthz", "--metrics-port=8000"]
DEFAULT_ARGS = [*leader_args(FULLNAME), *TAIL_ARGS]
# The node affinity the chart adds unless the values bring one: never on a GPU node.
OFF_GPUS = {
    "requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [
            {
                "matchExpressions": [
                    {"key": "nvidia.com/gpu.present", "operator": "NotIn", "values": ["true"]},
                    {"key": "cloud.google.com/gke-accelerator", "operator": "DoesNotExist"},
                ]
            }
        ]
    }
}
# The soft spread across nodes the chart adds unless the values bring a podAntiAffinity.
SPREAD = {
    "preferredDuringSchedulingIgnoredDuringExecution": [
        {
            "weight": 100,
            "podAffinityTerm": {
                "topologyKey": "kubernetes.io/hostname",
                "labelSelector": {"matchLabels": SELECTOR},
            },
        }
    ]
}


def container(manifests: list[Manifest]) -> dict[str, Any]:
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["operator"]
    return dict(pod["containers"][0])


# -- lint ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        [],
        ["--set", "watchNamespaces={team-a,team-b}"],
        ["--set", "metrics.serviceMonitor.enabled=true,grafanaDashboard.enabled=true"],
        ["--set", "rbac.rateSourceCredentials.enabled=true"],
        ["--set", "rbac.create=false,serviceAccount.create=false,serviceAccount.name=ops"],
        ["--set", "leaderElection.enabled=false,replicaCount=1"],
        ["--set", "clusterScopedTargets={nodepools.karpenter.sh},watchNamespaces={team-a}"],
        ["--values", str(EXTENSIONS)],
        ["--set", "router.enabled=true,router.allocation.name=mixed"],
        ["--values", str(EXTENSIONS), "--values", str(ROUTER_VALUES)],
    ],
    ids=[
        "defaults",
        "namespaced",
        "monitoring",
        "credentials",
        "no-rbac",
        "single",
        "karpenter",
        "extensions",
        "router",
        "router-extensions",
    ],
)
def test_lint_strict(options: list[str]) -> None:
    out = helm("lint", "--strict", str(CHART), *options)
    assert "1 chart(s) linted, 0 chart(s) failed" in out


def test_chart_metadata_follows_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == project["version"]
    assert chart["kubeVersion"] == ">=1.29.0-0"


# -- defaults --------------------------------------------------------------------------------------


def test_defaults_render_a_cluster_wide_operator() -> None:
    manifests = render()
    assert kinds(manifests) == [
        "ClusterRole",
        "ClusterRole",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "Deployment",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
    for manifest in manifests:
        labels = manifest["metadata"]["labels"]
        aggregated = {k: v for k, v in labels.items() if k.startswith("rbac.authorization.k8s.io/")}
        assert {k: v for k, v in labels.items() if k not in aggregated} == LABELS, manifest["kind"]
        assert bool(aggregated) == (manifest["metadata"]["name"] in {VIEW, EDIT})
        namespaced = manifest["kind"] not in cluster_scoped
        assert manifest["metadata"].get("namespace") == (RELEASE_NAMESPACE if namespaced else None)
    assert one(manifests, "ClusterRole", FULLNAME)["rules"] == DEFAULT_RULES
    binding = one(manifests, "ClusterRoleBinding", FULLNAME)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": FULLNAME,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": FULLNAME, "namespace": RELEASE_NAMESPACE}
    ]
    # Nothing cluster-scoped beyond the ClusterRole's namespaced kinds, unless the values list some.
    assert not find(manifests, "ClusterRole", CLUSTER_SCOPED)


def test_defaults_run_two_replicas_that_elect_a_leader_with_a_lease() -> None:
    manifests = render()
    deployment = one(manifests, "Deployment", FULLNAME)
    assert deployment["spec"]["replicas"] == 2
    # A rollout keeps a standby: the new pod starts before an old one stops.
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    operator = container(manifests)
    assert operator["args"] == DEFAULT_ARGS
    # $(POD_NAME) and $(POD_NAMESPACE) in the args come from the downward API.
    assert operator["env"] == [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["affinity"] == {"nodeAffinity": OFF_GPUS, "podAntiAffinity": SPREAD}

    # The Lease lives in the release namespace, where the operator's identity may take it.
    role = one(manifests, "Role", LEADER_ELECTION)
    assert role["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert role["rules"] == lease_rules(FULLNAME)
    binding = one(manifests, "RoleBinding", LEADER_ELECTION)
    assert binding["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": LEADER_ELECTION,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": FULLNAME, "namespace": RELEASE_NAMESPACE}
    ]
    # No Kopf peering: no peering resources anywhere in the RBAC.
    for manifest in manifests:
        for rule in manifest.get("rules", []):
            assert not any("peering" in resource for resource in rule["resources"])

    pdb = one(manifests, "PodDisruptionBudget", FULLNAME)
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": SELECTOR}}


def test_lease_name_can_be_set() -> None:
    manifests = render({"leaderElection": {"leaseName": "melange-leader"}})
    assert container(manifests)["args"] == [*leader_args("melange-leader"), *TAIL_ARGS]
    assert one(manifests, "Role", LEADER_ELECTION)["rules"] == lease_rules("melange-leader")


def test_without_leader_election_one_replica_is_recreated() -> None:
    manifests = render({"leaderElection": {"enabled": False}, "replicaCount": 1})
    deployment = one(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert container(manifests)["args"] == ["--no-leader-elect", *TAIL_ARGS]
    assert not find(manifests, "Role")
    assert not find(manifests, "RoleBinding")
    assert not find(manifests, "PodDisruptionBudget")


def test_pod_disruption_budget_only_for_more_than_one_replica() -> None:
    """With one replica, minAvailable 1 would block every node drain and maxUnavailable 1 would
    protect nothing: the chart renders no budget rather than a useless or a harmful one."""
    for replicas in (0, 1):
        manifests = render({"replicaCount": replicas})
        assert not find(manifests, "PodDisruptionBudget"), replicas
        assert one(manifests, "Role", LEADER_ELECTION)  # still electing: a rollout surges to 2
    assert one(render({"replicaCount": 3}), "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1

    spec = one(render({"podDisruptionBudget": {"minAvailable": 1}}), "PodDisruptionBudget")["spec"]
    assert spec == {"minAvailable": 1, "selector": {"matchLabels": SELECTOR}}
    percent = {"podDisruptionBudget": {"maxUnavailable": "50%"}, "replicaCount": 4}
    assert one(render(percent), "PodDisruptionBudget")["spec"]["maxUnavailable"] == "50%"
    assert not find(render({"podDisruptionBudget": {"enabled": False}}), "PodDisruptionBudget")
    with pytest.raises(HelmError, match="set maxUnavailable or minAvailable"):
        render({"podDisruptionBudget": {"maxUnavailable": None}})


def test_anti_affinity_is_soft_by_default_and_can_be_replaced_or_dropped() -> None:
    node_affinity: dict[str, Any] = {"preferredDuringSchedulingIgnoredDuringExecution": []}
    pod = one(render({"affinity": {"nodeAffinity": node_affinity}}), "Deployment")
    assert pod["spec"]["template"]["spec"]["affinity"] == {
        "nodeAffinity": node_affinity,
        "podAntiAffinity": SPREAD,
    }
    pod = one(render({"affinity": {"nodeAffinity": {}}}), "Deployment")
    assert pod["spec"]["template"]["spec"]["affinity"] == {
        "nodeAffinity": {},
        "podAntiAffinity": SPREAD,
    }
    hard = {
        "requiredDuringSchedulingIgnoredDuringExecution": [
            {
                "topologyKey": "topology.kubernetes.io/zone",
                "labelSelector": {"matchLabels": SELECTOR},
            }
        ]
    }
    pod = one(render({"affinity": {"podAntiAffinity": hard}}), "Deployment")
    assert pod["spec"]["template"]["spec"]["affinity"] == {
        "nodeAffinity": OFF_GPUS,
        "podAntiAffinity": hard,
    }
    pod = one(render({"affinity": {"podAntiAffinity": {}, "nodeAffinity": {}}}), "Deployment")
    assert pod["spec"]["template"]["spec"]["affinity"] == {
        "podAntiAffinity": {},
        "nodeAffinity": {},
    }


def test_deployment_runs_a_hardened_operator() -> None:
    manifests = render()
    deployment = one(manifests, "Deployment", FULLNAME)
    spec = deployment["spec"]
    assert spec["selector"] == {"matchLabels": SELECTOR}
    assert spec["template"]["metadata"]["labels"] == LABELS
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == one(manifests, "ServiceAccount")["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is True
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }

    operator = container(manifests)
    assert operator["image"] == "melange-operator:0.1.0"
    assert operator["command"] == ["melange", "run"]
    assert operator["args"] == DEFAULT_ARGS
    assert operator["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert operator["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"cpu": "1", "memory": "512Mi"},
    }
    # The probe asks the endpoint that --liveness serves.
    ports = {p["name"]: p["containerPort"] for p in operator["ports"]}
    assert ports == {"metrics": 8000, "healthz": 8080}
    probe = operator["livenessProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert {"initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold"} <= set(
        probe
    )
    # A writable /tmp on the read-only root: the Kubernetes client caches API discovery there.
    assert operator["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}]


def test_metrics_service_selects_the_operator_pod() -> None:
    manifests = render({"metrics": {"port": 9100}})
    service = one(manifests, "Service", f"{FULLNAME}-metrics")
    assert service["spec"]["selector"] == SELECTOR
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP"}
    ]
    operator = container(manifests)
    assert "--metrics-port=9100" in operator["args"]
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in operator["ports"]


def test_every_pod_option_reaches_the_pod() -> None:
    values = {
        "replicaCount": 0,
        "verbose": True,
        "image": {"pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/team": "serving"},
        "podLabels": {"team": "serving"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "infra", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {}, "nodeAffinity": {}},
        "livenessProbe": {"periodSeconds": 30, "failureThreshold": 5},
        "resources": {"requests": {"cpu": "50m"}, "limits": {"memory": "1Gi"}},
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:x"}},
        "metrics": {"service": {"annotations": {"prometheus.io/scrape": "true"}}},
    }
    manifests = render(values)
    deployment = one(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 0
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"] == values["podAnnotations"]
    assert template["metadata"]["labels"] == {**LABELS, "team": "serving"}
    pod = template["spec"]
    for key in ["imagePullSecrets", "priorityClassName", "nodeSelector", "tolerations", "affinity"]:
        assert pod[key] == values[key], key
    operator = container(manifests)
    assert operator["imagePullPolicy"] == "Always"
    assert operator["args"][-1] == "--verbose"
    assert operator["resources"] == {  # maps merge with the defaults
        "requests": {"cpu": "50m", "memory": "128Mi"},
        "limits": {"cpu": "1", "memory": "1Gi"},
    }
    assert operator["livenessProbe"]["periodSeconds"] == 30
    assert operator["livenessProbe"]["failureThreshold"] == 5
    assert one(manifests, "ServiceAccount")["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:x"
    }
    assert one(manifests, "Service")["metadata"]["annotations"] == {"prometheus.io/scrape": "true"}


def test_ids_can_be_left_to_the_platform() -> None:
    """OpenShift's restricted SCC assigns the UID: null removes the chart's."""
    values = {"podSecurityContext": {"runAsUser": None, "runAsGroup": None}}
    pod = one(render(values), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def test_names_can_be_overridden() -> None:
    manifests = render({"nameOverride": "melange"})
    assert one(manifests, "Deployment")["metadata"]["name"] == f"{RELEASE}-melange"
    assert one(manifests, "Deployment")["spec"]["selector"]["matchLabels"] == {
        **SELECTOR,
        "app.kubernetes.io/name": "melange",
    }
    manifests = render({"fullnameOverride": "mo"})
    assert {m["metadata"]["name"] for m in manifests} == {
        "mo",
        "mo-metrics",
        "mo-leader-election",
        "mo-view",
        "mo-edit",
        CRD_NAME,  # named by its group and kind, never by the release
    }
    assert container(manifests)["args"][:2] == ["--leader-elect", "--lease-name=mo"]


# -- namespaces and RBAC ---------------------------------------------------------------------------


def test_watch_namespaces_get_a_role_each_and_no_cluster_role() -> None:
    manifests = render({"watchNamespaces": ["team-a", "team-b"]})
    assert not find(manifests, "ClusterRole", FULLNAME)
    assert not find(manifests, "ClusterRoleBinding")
    # The Lease stays in the release namespace, whatever the operator watches.
    assert one(manifests, "Role", LEADER_ELECTION)["metadata"]["namespace"] == RELEASE_NAMESPACE
    roles = find(manifests, "Role", FULLNAME)
    assert [(r["metadata"]["name"], r["metadata"]["namespace"]) for r in roles] == [
        (FULLNAME, "team-a"),
        (FULLNAME, "team-b"),
    ]
    assert all(r["rules"] == DEFAULT_RULES for r in roles)
    bindings = find(manifests, "RoleBinding", FULLNAME)
    assert [b["metadata"]["namespace"] for b in bindings] == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": FULLNAME,
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": FULLNAME, "namespace": RELEASE_NAMESPACE}
        ]
    assert container(manifests)["args"] == [
        "--namespace=team-a",
        "--namespace=team-b",
        *DEFAULT_ARGS,
    ]


def test_allowed_rate_source_urls_are_passed_as_flags() -> None:
    allowed = ["http://prometheus-operated.monitoring.svc:9090", "https://thanos.example/prom"]
    args = container(render({"rateSource": {"allowedURLs": allowed}}))["args"]
    assert [a for a in args if a.startswith("--allow-prometheus-url")] == [
        "--allow-prometheus-url=http://prometheus-operated.monitoring.svc:9090",
        "--allow-prometheus-url=https://thanos.example/prom",
    ]
    assert container(render({}))["args"] == DEFAULT_ARGS


@pytest.mark.parametrize(
    "url", ["prometheus:9090", "http://p/#", "http://p?x=1", "http://u@p", "ftp://p"]
)
def test_an_allowed_url_that_is_not_a_base_url_is_refused_by_the_schema(url: str) -> None:
    with pytest.raises(HelmError, match="allowedURLs"):
        render({"rateSource": {"allowedURLs": [url]}})


@pytest.mark.parametrize("watch", [[], ["team-a"]], ids=["cluster-wide", "namespaced"])
def test_cluster_scoped_targets_are_allowed_by_flag_and_a_cluster_role(watch: list[str]) -> None:
    targets = ["nodepools.karpenter.sh", "widgets.example.co.uk"]
    manifests = render({"clusterScopedTargets": targets, "watchNamespaces": watch})
    args = container(manifests)["args"]
    assert args[len(watch) + 4 : len(watch) + 6] == [
        "--allow-cluster-scoped=nodepools.karpenter.sh",
        "--allow-cluster-scoped=widgets.example.co.uk",
    ]
    role = one(manifests, "ClusterRole", CLUSTER_SCOPED)
    assert role["rules"] == [
        {
            "apiGroups": ["karpenter.sh"],
            "resources": ["nodepools/scale"],
            "verbs": ["get", "patch"],
        },
        {"apiGroups": ["karpenter.sh"], "resources": ["nodepools"], "verbs": ["get"]},
        {"apiGroups": ["example.co.uk"], "resources": ["widgets/scale"], "verbs": ["get", "patch"]},
        {"apiGroups": ["example.co.uk"], "resources": ["widgets"], "verbs": ["get"]},
    ]
    binding = one(manifests, "ClusterRoleBinding", CLUSTER_SCOPED)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": CLUSTER_SCOPED,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": FULLNAME, "namespace": RELEASE_NAMESPACE}
    ]
    # The namespaced kinds' rules are unchanged by it.
    for role in find(manifests, "ClusterRole", FULLNAME) + find(manifests, "Role", FULLNAME):
        assert role["rules"] == DEFAULT_RULES

    plain = render({"watchNamespaces": watch})
    assert not any(arg.startswith("--allow-cluster-scoped") for arg in container(plain)["args"])
    assert not find(plain, "ClusterRole", CLUSTER_SCOPED)
    assert not find(plain, "ClusterRoleBinding", CLUSTER_SCOPED)
    # Without RBAC from the chart, the flag is still passed: the user grants the permissions.
    own = render({"clusterScopedTargets": targets, "rbac": {"create": False}})
    assert "--allow-cluster-scoped=nodepools.karpenter.sh" in container(own)["args"]
    assert not find(own, "ClusterRole", CLUSTER_SCOPED)


def test_scale_targets_grant_the_scale_subresource_or_the_object() -> None:
    targets = [
        {"apiGroup": "apps", "resource": "statefulsets"},  # via defaults to scale
        {"apiGroup": "karpenter.sh", "resource": "nodepools", "via": "replicasPath"},
    ]
    rules = one(render({"rbac": {"scaleTargets": targets}}), "ClusterRole", FULLNAME)["rules"]
    assert rules == [
        *BASE_RULES,
        {"apiGroups": ["apps"], "resources": ["statefulsets/scale"], "verbs": ["get", "patch"]},
        {"apiGroups": ["apps"], "resources": ["statefulsets"], "verbs": ["get"]},
        {"apiGroups": ["karpenter.sh"], "resources": ["nodepools"], "verbs": ["get", "patch"]},
    ]
    assert (
        one(render({"rbac": {"scaleTargets": []}}), "ClusterRole", FULLNAME)["rules"] == BASE_RULES
    )


def test_price_sources_are_off_by_default_and_can_be_narrowed() -> None:
    rules = one(render({"rbac": {"priceSources": {"enabled": True}}}), "ClusterRole", FULLNAME)[
        "rules"
    ]
    assert rules == [
        *DEFAULT_RULES,
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]},
    ]
    narrowed = {"enabled": True, "configMapNames": ["gpu-prices"]}
    manifests = render({"watchNamespaces": ["team-a"], "rbac": {"priceSources": narrowed}})
    assert one(manifests, "Role", FULLNAME)["rules"][-1] == {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": ["gpu-prices"],
        "verbs": ["get"],
    }


def test_rate_source_credentials_are_off_by_default_and_can_be_narrowed() -> None:
    for manifest in render():
        for rule in manifest.get("rules", []):
            assert not {"secrets", "configmaps"} & set(rule["resources"])

    rules = one(
        render({"rbac": {"rateSourceCredentials": {"enabled": True}}}), "ClusterRole", FULLNAME
    )["rules"]
    assert rules == [
        *DEFAULT_RULES,
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]},
    ]
    narrowed = {
        "enabled": True,
        "secretNames": ["prometheus-token"],
        "configMapNames": ["prometheus-ca", "other-ca"],
    }
    manifests = render({"watchNamespaces": ["team-a"], "rbac": {"rateSourceCredentials": narrowed}})
    assert one(manifests, "Role", FULLNAME)["rules"][-2:] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["prometheus-token"],
            "verbs": ["get"],
        },
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["prometheus-ca", "other-ca"],
            "verbs": ["get"],
        },
    ]


def test_rbac_and_service_account_can_be_brought_by_the_user() -> None:
    manifests = render(
        {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "x"}}
    )
    # The CRD and the aggregated roles for the users of allocations are not the operator's RBAC.
    assert kinds(manifests) == [
        "ClusterRole",
        "ClusterRole",
        "CustomResourceDefinition",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
    ]
    assert {m["metadata"]["name"] for m in find(manifests, "ClusterRole")} == {VIEW, EDIT}
    assert one(manifests, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "x"

    with pytest.raises(HelmError, match=r"serviceAccount\.name is required"):
        render({"serviceAccount": {"create": False}})

    named = render({"serviceAccount": {"name": "melange"}})
    assert one(named, "ServiceAccount")["metadata"]["name"] == "melange"
    assert one(named, "ClusterRoleBinding")["subjects"][0]["name"] == "melange"
    assert one(named, "RoleBinding", LEADER_ELECTION)["subjects"][0]["name"] == "melange"


# -- monitoring ------------------------------------------------------------------------------------


def test_service_monitor_only_when_enabled() -> None:
    assert not find(render(api_versions=[SERVICE_MONITOR_API]), "ServiceMonitor")
    values = {
        "metrics": {
            "serviceMonitor": {
                "enabled": True,
                "labels": {"release": "kube-prometheus-stack"},
                "interval": "15s",
                "scrapeTimeout": "10s",
            }
        }
    }
    monitor = one(render(values, api_versions=[SERVICE_MONITOR_API]), "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"] == {**LABELS, "release": "kube-prometheus-stack"}
    assert monitor["spec"] == {
        "selector": {"matchLabels": SELECTOR},
        "namespaceSelector": {"matchNames": [RELEASE_NAMESPACE]},
        "endpoints": [
            {
                "port": "metrics",
                "path": "/metrics",
                "interval": "15s",
                "scrapeTimeout": "10s",
                "honorLabels": True,
            }
        ],
    }
    relabelings = [{"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}]
    metric_relabelings = [{"regex": "melange_solve_duration_seconds_bucket", "action": "drop"}]
    values["metrics"]["serviceMonitor"] |= {
        "honorLabels": False,
        "relabelings": relabelings,
        "metricRelabelings": metric_relabelings,
    }
    monitor = one(render(values, api_versions=[SERVICE_MONITOR_API]), "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["honorLabels"] is False
    assert endpoint["relabelings"] == relabelings
    assert endpoint["metricRelabelings"] == metric_relabelings


def _exported_names() -> set[str]:
    """Every series name the operator exports, from the metric definitions themselves."""
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    return {
        family.name + suffix
        for family in metrics.REGISTRY.collect()
        for suffix in suffixes[family.type]
    }


def test_grafana_dashboard_shows_only_metrics_the_operator_exports() -> None:
    assert not find(render(), "ConfigMap")
    manifests = render({"grafanaDashboard": {"enabled": True, "namespace": "monitoring"}})
    config_map = one(manifests, "ConfigMap", f"{FULLNAME}-dashboard")
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"] == {**LABELS, "grafana_dashboard": "1"}
    dashboard = json.loads(config_map["data"]["melange-operator.json"])
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bmelange_[a-z_]+", expr)}
    assert used <= _exported_names(), used - _exported_names()
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ["cost", "replicas per gpu type", "request rate", "re-solves"]:
        assert topic in titles


# -- extension points ------------------------------------------------------------------------------


def test_every_extension_value_reaches_its_object() -> None:
    values = yaml.safe_load(EXTENSIONS.read_text())
    manifests = render(values)
    # additionalLabels on every object and on the pod; the selectors never change.
    for manifest in manifests:
        labels = manifest["metadata"]["labels"]
        assert labels["team"] == "serving", manifest["kind"]
        assert labels["cost-center"] == "gpu-42", manifest["kind"]
    deployment = one(manifests, "Deployment")
    assert deployment["spec"]["selector"] == {"matchLabels": SELECTOR}
    template = deployment["spec"]["template"]
    assert template["metadata"]["labels"] == {
        **LABELS,
        "team": "serving",
        "cost-center": "gpu-42",
        "tier": "control",
    }
    assert template["metadata"]["annotations"] == {"example.com/owner": "platform"}
    operator = container(manifests)
    # env after the downward-API variables the args need; extra args after the chart's own.
    assert [e["name"] for e in operator["env"]] == ["POD_NAME", "POD_NAMESPACE"] + [
        e["name"] for e in values["env"]
    ]
    assert operator["env"][2:] == values["env"]
    assert operator["args"] == [*DEFAULT_ARGS, *values["extraArgs"]]
    assert operator["volumeMounts"] == [
        {"name": "tmp", "mountPath": "/tmp"},
        *values["extraVolumeMounts"],
    ]
    pod = template["spec"]
    assert pod["volumes"] == [
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
        *values["extraVolumes"],
    ]
    assert pod["topologySpreadConstraints"] == values["topologySpreadConstraints"]
    # A nodeAffinity of the values replaces the chart's; the spread stays.
    assert pod["affinity"] == {
        "nodeAffinity": values["affinity"]["nodeAffinity"],
        "podAntiAffinity": SPREAD,
    }
    monitor = one(manifests, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["relabelings"] == values["metrics"]["serviceMonitor"]["relabelings"]
    assert endpoint["metricRelabelings"] == values["metrics"]["serviceMonitor"]["metricRelabelings"]
    policy = one(manifests, "NetworkPolicy", FULLNAME)
    assert policy["spec"]["ingress"][0]["from"] == values["networkPolicy"]["metricsFrom"]
    rule = one(manifests, "PrometheusRule", FULLNAME)
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert one(manifests, "ConfigMap", f"{FULLNAME}-dashboard")


def test_extension_values_are_empty_by_default() -> None:
    manifests = render()
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert "topologySpreadConstraints" not in pod
    assert [e["name"] for e in container(manifests)["env"]] == ["POD_NAME", "POD_NAMESPACE"]
    for kind in ("NetworkPolicy", "PrometheusRule", "ServiceMonitor", "ConfigMap"):
        assert not find(manifests, kind), kind


def test_aggregated_cluster_roles_let_view_and_edit_users_use_allocations() -> None:
    manifests = render()
    view, edit = one(manifests, "ClusterRole", VIEW), one(manifests, "ClusterRole", EDIT)
    aggregate = "rbac.authorization.k8s.io/aggregate-to-"
    assert {k: v for k, v in view["metadata"]["labels"].items() if k.startswith(aggregate)} == {
        f"{aggregate}view": "true",
        f"{aggregate}edit": "true",
        f"{aggregate}admin": "true",
    }
    assert {k: v for k, v in edit["metadata"]["labels"].items() if k.startswith(aggregate)} == {
        f"{aggregate}edit": "true",
        f"{aggregate}admin": "true",
    }
    assert view["rules"] == [
        {
            "apiGroups": ["melange.dev"],
            "resources": ["melangeallocations", "melangeallocations/status"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    # Writing allocations, never their status: that is the operator's.
    assert edit["rules"] == [
        {
            "apiGroups": ["melange.dev"],
            "resources": ["melangeallocations"],
            "verbs": ["create", "update", "patch", "delete", "deletecollection"],
        }
    ]
    off = render({"rbac": {"aggregateClusterRoles": False}})
    assert not find(off, "ClusterRole", VIEW)
    assert not find(off, "ClusterRole", EDIT)


def test_network_policy_admits_metrics_and_probes_only() -> None:
    manifests = render({"networkPolicy": {"enabled": True}})
    policy = one(manifests, "NetworkPolicy", FULLNAME)
    assert policy["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert policy["spec"] == {
        "podSelector": {"matchLabels": SELECTOR},
        "policyTypes": ["Ingress"],
        "ingress": [
            {"ports": [{"port": "metrics", "protocol": "TCP"}]},
            {"ports": [{"port": "healthz", "protocol": "TCP"}]},
        ],
    }
    # The named ports exist on the operator container.
    assert {p["name"] for p in container(manifests)["ports"]} == {"metrics", "healthz"}


def _alerts(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rule = one(render({"prometheusRule": {"enabled": True, **values}}), "PrometheusRule")
    (group,) = rule["spec"]["groups"]
    return {r["alert"]: r for r in group["rules"]}


def test_prometheus_rule_thresholds_come_from_the_values() -> None:
    alerts = _alerts({})
    assert {name: (r["for"], r["labels"]) for name, r in alerts.items()} == {
        "MelangeAllocationNotReady": ("15m", {"severity": "warning"}),
        "MelangeRateSourceDown": ("10m", {"severity": "warning"}),
        "MelangePoolsNotAtPlan": ("15m", {"severity": "warning"}),
        "MelangeSolveFailing": ("5m", {"severity": "critical"}),
    }
    assert "[10m]" in alerts["MelangeSolveFailing"]["expr"]

    custom = {
        "additionalRuleLabels": {"team": "serving"},
        "alerts": {
            "notReady": {"for": "1h", "severity": "page"},
            "rateSourceDown": {"enabled": False},
            "solveFailing": {"window": "30m"},
        },
    }
    alerts = _alerts(custom)
    assert "MelangeRateSourceDown" not in alerts
    assert alerts["MelangeAllocationNotReady"]["for"] == "1h"
    assert alerts["MelangeAllocationNotReady"]["labels"] == {"severity": "page", "team": "serving"}
    assert "[30m]" in alerts["MelangeSolveFailing"]["expr"]
    used = {n for r in alerts.values() for n in re.findall(r"\bmelange_[a-z_]+", r["expr"])}
    assert used <= _exported_names(), used - _exported_names()


# -- values and schema -----------------------------------------------------------------------------


def _keys_with_comments(text: str) -> list[tuple[str, str]]:
    """(dotted key, the comment block just above it) for every mapping key of values.yaml."""
    result: list[tuple[str, str]] = []
    stack: list[tuple[int, str]] = []
    comment: list[str] = []
    sequence_indent: int | None = None  # inside the items of a list: documented by the list
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("# "))
            continue
        if stripped.startswith("- "):
            sequence_indent = indent if sequence_indent is None else sequence_indent
        if sequence_indent is not None and indent >= sequence_indent:
            comment = []
            continue
        sequence_indent = None
        match = re.match(r"([A-Za-z_][\w.-]*):", stripped)
        if not match:
            comment = []
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([*(k for _, k in stack), match.group(1)])
        result.append((path, " ".join(comment)))
        stack.append((indent, match.group(1)))
        comment = []
    return result


# Values that are Kubernetes objects passed through as they are: documented as a whole.
PASS_THROUGH = (
    "resources.",
    "podSecurityContext.",
    "securityContext.",
    "grafanaDashboard.labels.",
    "router.resources.",
)


def test_every_value_is_documented_by_a_comment_starting_with_its_name() -> None:
    keys = _keys_with_comments((CHART / "values.yaml").read_text())
    assert len(keys) > 30
    undocumented = [
        path
        for path, comment in keys
        if not path.startswith(PASS_THROUGH) and not comment.startswith(path + " ")
    ]
    assert not undocumented


def test_every_value_is_in_the_table_of_docs_helm_md() -> None:
    """Each value (each top-level key, and each key of the objects the table splits up) has a row
    in docs/helm.md's Values table."""
    doc = (REPO / "docs" / "helm.md").read_text()
    table = doc.split("\n## Values\n", 1)[1].split("\n## ", 1)[0]
    cells = " ".join(line.split("|")[1] for line in table.splitlines() if line.startswith("| `"))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [key for key in values if f"`{key}" not in cells]
    parents: tuple[str, ...] = (
        "crds",
        "metrics.serviceMonitor",
        "networkPolicy",
        "prometheusRule",
        "router",
    )
    # ... and each router object's keys, but for those documented as a whole, as at the top level.
    whole = {"resources", "livenessProbe", "readinessProbe"}
    parents += tuple(
        f"router.{key}"
        for key, value in values["router"].items()
        if isinstance(value, dict) and key not in whole
    )
    for parent in parents:
        node = values
        for part in parent.split("."):
            node = node[part]
        missing += [
            f"{parent}.{key}"
            for key in node
            if f"`{parent}.{key}" not in cells and f"`.{key}`" not in cells
        ]
    assert not missing


def test_schema_closes_every_object_and_accepts_the_defaults() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, path
            for key, child in node.items():
                walk(child, f"{path}/{key}")
        elif isinstance(node, list):
            for index, child in enumerate(node):
                walk(child, f"{path}/{index}")

    walk(schema, "")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicas": 2}, "at '': additional properties 'replicas' not allowed"),
        ({"image": {"tagg": "x"}}, "at '/image': additional properties 'tagg' not allowed"),
        (
            {"metrics": {"serviceMonitor": {"enable": True}}},
            "at '/metrics/serviceMonitor': additional properties 'enable' not allowed",
        ),
        ({"replicaCount": -1}, "at '/replicaCount': minimum: got -1, want 0"),
        # Without a Lease, two replicas would reconcile the same allocations at once.
        ({"leaderElection": {"enabled": False}}, "at '/replicaCount': maximum: got 2, want 1"),
        ({"leaderElection": {"leaseName": "Lease_1"}}, "at '/leaderElection/leaseName'"),
        ({"leaderElection": {"elect": True}}, "additional properties 'elect' not allowed"),
        (
            {"podDisruptionBudget": {"maxUnavailable": "half"}},
            "at '/podDisruptionBudget/maxUnavailable'",
        ),
        ({"podDisruptionBudget": {"minAvailable": -1}}, "at '/podDisruptionBudget/minAvailable'"),
        ({"clusterScopedTargets": ["nodepools"]}, "at '/clusterScopedTargets/0'"),  # no group
        ({"clusterScopedTargets": ["NodePools.karpenter.sh"]}, "at '/clusterScopedTargets/0'"),
        (
            {"clusterScopedTargets": ["nodepools/scale.karpenter.sh"]},
            "at '/clusterScopedTargets/0'",
        ),
        ({"clusterScopedTargets": ["karpenter.sh/nodepools"]}, "at '/clusterScopedTargets/0'"),
        (
            {"clusterScopedTargets": ["nodepools.karpenter.sh", "nodepools.karpenter.sh"]},
            "at '/clusterScopedTargets'",
        ),
        (
            {"rbac": {"scaleTargets": [{"apiGroup": "apps", "resource": "x", "via": "patch"}]}},
            "at '/rbac/scaleTargets/0/via'",
        ),
        (
            {"rbac": {"scaleTargets": [{"resource": "deployments"}]}},
            "at '/rbac/scaleTargets/0': missing property 'apiGroup'",
        ),
        ({"watchNamespaces": ["Team_A"]}, "at '/watchNamespaces/0'"),
        ({"metrics": {"port": 8080}}, "at '/metrics/port'"),
        ({"extraVolume": []}, "at '': additional properties 'extraVolume' not allowed"),
        ({"crds": {"instal": True}}, "at '/crds': additional properties 'instal' not allowed"),
        ({"extraArgs": "--verbose"}, "at '/extraArgs'"),
        ({"env": [{"value": "x"}]}, "at '/env/0': missing property 'name'"),
        ({"extraVolumeMounts": [{"name": "ca"}]}, "at '/extraVolumeMounts/0'"),
        ({"topologySpreadConstraints": [{"maxSkew": 1}]}, "at '/topologySpreadConstraints/0'"),
        ({"additionalLabels": {"team": 1}}, "at '/additionalLabels/team'"),
        ({"networkPolicy": {"enable": True}}, "additional properties 'enable' not allowed"),
        ({"rbac": {"aggregateClusterRole": True}}, "additional properties 'aggregateClusterRole'"),
        (
            {"metrics": {"serviceMonitor": {"relabelings": [{"sourceLabel": ["pod"]}]}}},
            "at '/metrics/serviceMonitor/relabelings/0'",
        ),
        (
            {"metrics": {"serviceMonitor": {"metricRelabelings": [{"action": "delete"}]}}},
            "at '/metrics/serviceMonitor/metricRelabelings/0/action'",
        ),
        (
            {"prometheusRule": {"alerts": {"notReady": {"for": "15 minutes"}}}},
            "at '/prometheusRule/alerts/notReady/for'",
        ),
        (
            {"prometheusRule": {"alerts": {"notready": {"for": "15m"}}}},
            "additional properties 'notready' not allowed",
        ),
    ],
)
def test_schema_rejects_bad_values_naming_the_key(values: dict[str, Any], message: str) -> None:
    with pytest.raises(HelmError) as error:
        render(values)
    assert "values don't meet the specifications of the schema" in str(error.value)
    assert message in str(error.value)


# -- image and CRD ---------------------------------------------------------------------------------


def test_image_tag_defaults_to_app_version_and_a_digest_wins() -> None:
    assert container(render({"image": {"tag": "dev"}}))["image"] == "melange-operator:dev"
    digest = "sha256:" + "ab" * 32
    pinned = render({"image": {"repository": "registry.example/melange", "digest": digest}})
    assert container(pinned)["image"] == f"registry.example/melange@{digest}"


def test_crd_is_a_copy_of_the_single_file_in_crds(tmp_path: Path) -> None:
    """The chart's CRD file is a copy, byte for byte, of the repository's (docs/contributing.md
    says how to refresh it); the chart has no link left (Helm warns about links on every command),
    and no crds/ directory, which Helm would install once and never upgrade."""
    copy = CHART / "files" / "crds" / f"{CRD_NAME}.yaml"
    source = REPO / "crds" / f"{CRD_NAME}.yaml"
    assert not copy.is_symlink()
    assert copy.read_bytes() == source.read_bytes()
    assert not [path for path in CHART.rglob("*") if path.is_symlink()]
    assert not (CHART / "crds").exists()

    # Rendered as a template: the file's spec exactly, with the chart's labels, kept on uninstall.
    crd = one(render(), "CustomResourceDefinition", CRD_NAME)
    original = yaml.safe_load(source.read_text())
    assert crd["spec"] == original["spec"]
    assert crd["metadata"] == {
        "name": CRD_NAME,
        "labels": {**original["metadata"]["labels"], **LABELS},
        "annotations": {"helm.sh/resource-policy": "keep"},
    }
    assert (
        "annotations"
        not in one(render({"crds": {"keep": False}}), "CustomResourceDefinition")["metadata"]
    )
    assert not find(render({"crds": {"install": False}}), "CustomResourceDefinition")
    # Nothing in crds/: even `helm template --include-crds` renders the CRD once.
    assert len(find(render(include_crds=True), "CustomResourceDefinition")) == 1

    # A packaged chart holds the copy.
    helm("package", str(CHART), "--destination", str(tmp_path))
    with tarfile.open(tmp_path / "melange-operator-0.1.0.tgz") as archive:
        names = archive.getnames()
        assert not [name for name in names if name.startswith("melange-operator/crds/")]
        member = archive.getmember(f"melange-operator/files/crds/{CRD_NAME}.yaml")
        assert member.isfile()
        extracted = archive.extractfile(member)
        assert extracted is not None
        assert extracted.read() == source.read_bytes()


def test_readme_metrics_section_lists_every_metric() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(melange_[a-z_]+)`", section))
    families = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in metrics.REGISTRY.collect()
    }
    assert listed == families
