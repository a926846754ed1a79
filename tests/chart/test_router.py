"""The router (`melange route`, router.enabled) as the real helm renders it: off by default, each of
its objects when on, the HPA owning the replica count, its RBAC confined to the allocation's
namespace, and the values schema of the router section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from .expected import (
    DEFAULT_RULES,
    LABELS,
    ROUTER_LABELS,
    ROUTER_SELECTOR,
    SELECTOR,
    publisher_rules,
    router_args,
    router_rules,
)
from .helm import (
    CHART,
    FULLNAME,
    RELEASE_NAMESPACE,
    HelmError,
    Manifest,
    find,
    helm,
    kinds,
    one,
    render,
)

ROUTER = f"{FULLNAME}-router"
PUBLISHER = f"{ROUTER}-publisher"
ROUTER_VALUES = Path(__file__).parent / "data" / "values-router.yaml"
SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"
ENABLED: dict[str, Any] = {"router": {"enabled": True, "allocation": {"name": "mixed"}}}
ARGS = router_args("mixed", RELEASE_NAMESPACE)
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


def router(**values: Any) -> dict[str, Any]:
    """Values with the router on for the allocation `mixed`, and `values` in router."""
    return {"router": {**ENABLED["router"], **values}}


def objects(manifests: list[Manifest]) -> list[Manifest]:
    """The router's objects: those with its labels."""
    return [
        m
        for m in manifests
        if m["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "router"
    ]


def pod(manifests: list[Manifest]) -> dict[str, Any]:
    return dict(one(manifests, "Deployment", ROUTER)["spec"]["template"]["spec"])


def container(manifests: list[Manifest]) -> dict[str, Any]:
    spec = pod(manifests)
    assert [c["name"] for c in spec["containers"]] == ["router"]
    return dict(spec["containers"][0])


def test_lint_strict_with_every_router_value() -> None:
    out = helm("lint", "--strict", str(CHART), "--values", str(ROUTER_VALUES))
    assert "1 chart(s) linted, 0 chart(s) failed" in out
    # On without an allocation: lint fails (the schema's message is on its stdout).
    with pytest.raises(HelmError, match="1 chart\\(s\\) failed"):
        helm("lint", "--strict", str(CHART), "--set", "router.enabled=true")


def test_off_by_default_renders_nothing_of_the_router() -> None:
    manifests = render()
    assert not objects(manifests)
    assert not [m for m in manifests if "router" in m["metadata"]["name"]]
    assert "HorizontalPodAutoscaler" not in kinds(manifests)
    # Its other values change nothing while it is off.
    everything = yaml.safe_load(ROUTER_VALUES.read_text())
    everything["router"]["enabled"] = False
    off = render(everything, api_versions=[SERVICE_MONITOR_API])
    assert not objects(off)
    assert kinds(off) == kinds(manifests)


def test_on_renders_each_object_of_the_router() -> None:
    manifests = render(ENABLED)
    routed = objects(manifests)
    assert kinds(routed) == [
        "Deployment",
        "PodDisruptionBudget",
        "Role",
        "Role",
        "RoleBinding",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]
    for manifest in routed:
        name = (
            ROUTER
            if manifest["kind"] not in {"Role", "RoleBinding"}
            else manifest["metadata"]["name"]
        )
        assert manifest["metadata"]["name"] == name, manifest["kind"]
        assert manifest["metadata"]["labels"] == ROUTER_LABELS, manifest["kind"]
        assert manifest["metadata"]["namespace"] == RELEASE_NAMESPACE, manifest["kind"]
    assert {m["metadata"]["name"] for m in find(routed, "Role")} == {ROUTER, PUBLISHER}
    # The operator's objects are as they were.
    assert [m for m in manifests if m not in routed] == render()


def test_deployment_runs_melange_route_on_the_allocations_table() -> None:
    manifests = render(ENABLED)
    deployment = one(manifests, "Deployment", ROUTER)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["selector"] == {"matchLabels": ROUTER_SELECTOR}
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0},
    }
    template = deployment["spec"]["template"]
    assert template["metadata"]["labels"] == ROUTER_LABELS
    spec = template["spec"]
    assert spec["serviceAccountName"] == ROUTER
    assert spec["automountServiceAccountToken"] is True
    assert spec["terminationGracePeriodSeconds"] == 60
    route = container(manifests)
    assert route["command"] == ["melange", "route"]
    assert route["args"] == ARGS
    assert route["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert route["livenessProbe"] == {
        "httpGet": {"path": "/healthz", "port": "http"},
        "initialDelaySeconds": 5,
        "periodSeconds": 10,
        "timeoutSeconds": 5,
        "failureThreshold": 3,
    }
    assert route["readinessProbe"] == {
        "httpGet": {"path": "/readyz", "port": "http"},
        "initialDelaySeconds": 0,
        "periodSeconds": 5,
        "timeoutSeconds": 5,
        "failureThreshold": 3,
    }
    # Requests by default, so that an HPA on CPU has something to take a share of.
    assert route["resources"] == {
        "requests": {"cpu": "500m", "memory": "256Mi"},
        "limits": {"memory": "1Gi"},
    }
    # The operator's image and hardening: the same pod and container security contexts.
    operator_pod = one(manifests, "Deployment", FULLNAME)["spec"]["template"]["spec"]
    (operator,) = operator_pod["containers"]
    assert route["image"] == operator["image"] == "melange-operator:0.1.0"
    assert route["imagePullPolicy"] == operator["imagePullPolicy"]
    assert route["securityContext"] == operator["securityContext"]
    assert route["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"] == operator_pod["securityContext"]
    assert route["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert spec["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}]
    assert "env" not in route
    # Off GPU nodes, spread across nodes, like the operator, but on its own labels.
    assert spec["affinity"] == {
        "nodeAffinity": OFF_GPUS,
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": ROUTER_SELECTOR},
                    },
                }
            ]
        },
    }


def test_service_sends_port_80_to_the_router_pods() -> None:
    manifests = render(router(service={"annotations": {"example.com/gateway": "llm"}}))
    service = one(manifests, "Service", ROUTER)
    assert service["metadata"]["annotations"] == {"example.com/gateway": "llm"}
    assert service["spec"] == {
        "type": "ClusterIP",
        "selector": ROUTER_SELECTOR,
        "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
    }
    port = one(render(router(service={"port": 8000})), "Service", ROUTER)["spec"]["ports"][0]
    assert (port["port"], port["targetPort"]) == (8000, "http")


def test_no_selector_of_the_operator_matches_the_router_nor_the_reverse() -> None:
    values = {**router(serviceMonitor={"enabled": True})}
    values["metrics"] = {"serviceMonitor": {"enabled": True}}
    values["networkPolicy"] = {"enabled": True}
    manifests = render(values, api_versions=[SERVICE_MONITOR_API])
    router_pod = one(manifests, "Deployment", ROUTER)["spec"]["template"]["metadata"]["labels"]
    operator_pod = one(manifests, "Deployment", FULLNAME)["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return selector.items() <= labels.items()

    operator_selectors = [
        one(manifests, "Deployment", FULLNAME)["spec"]["selector"]["matchLabels"],
        one(manifests, "Service", f"{FULLNAME}-metrics")["spec"]["selector"],
        one(manifests, "PodDisruptionBudget", FULLNAME)["spec"]["selector"]["matchLabels"],
        one(manifests, "NetworkPolicy", FULLNAME)["spec"]["podSelector"]["matchLabels"],
    ]
    router_selectors = [
        one(manifests, "Deployment", ROUTER)["spec"]["selector"]["matchLabels"],
        one(manifests, "Service", ROUTER)["spec"]["selector"],
        one(manifests, "PodDisruptionBudget", ROUTER)["spec"]["selector"]["matchLabels"],
    ]
    for selector in operator_selectors:
        assert selects(selector, operator_pod)
        assert not selects(selector, router_pod)
    for selector in router_selectors:
        assert selects(selector, router_pod)
        assert not selects(selector, operator_pod)
    # Each ServiceMonitor selects its own Service only.
    monitors = {m["metadata"]["name"]: m for m in find(manifests, "ServiceMonitor")}
    services = {m["metadata"]["name"]: m["metadata"]["labels"] for m in find(manifests, "Service")}
    for monitor, service in [(FULLNAME, f"{FULLNAME}-metrics"), (ROUTER, ROUTER)]:
        selector = monitors[monitor]["spec"]["selector"]["matchLabels"]
        assert [name for name, labels in services.items() if selects(selector, labels)] == [service]


def test_rbac_is_a_role_in_the_allocations_namespace_for_the_routers_identity() -> None:
    manifests = render(router(allocation={"name": "chat", "namespace": "serving"}))
    role = one(manifests, "Role", ROUTER)
    assert role["metadata"]["namespace"] == "serving"
    assert role["rules"] == router_rules("chat")
    binding = one(manifests, "RoleBinding", ROUTER)
    assert binding["metadata"]["namespace"] == "serving"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": ROUTER,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": ROUTER, "namespace": RELEASE_NAMESPACE}
    ]
    assert container(manifests)["args"] == router_args("chat", "serving")
    # Nothing cluster-wide, nothing on Secrets, and the operator's roles are unchanged.
    assert [m for m in objects(manifests) if m["kind"].startswith("Cluster")] == []
    for manifest in objects(manifests):
        for rule in manifest.get("rules", []):
            assert "secrets" not in rule["resources"]
    assert find(manifests, "ClusterRole", FULLNAME) == find(render(), "ClusterRole", FULLNAME)

    # Its own ServiceAccount, or one the user brings; its Role, or none.
    named = render(router(serviceAccount={"name": "llm-router", "annotations": {"a": "b"}}))
    assert one(named, "ServiceAccount", "llm-router")["metadata"]["annotations"] == {"a": "b"}
    assert pod(named)["serviceAccountName"] == "llm-router"
    assert one(named, "RoleBinding", ROUTER)["subjects"][0]["name"] == "llm-router"
    brought = render(router(serviceAccount={"create": False, "name": "x"}, rbac={"create": False}))
    assert kinds(objects(brought)) == [
        "Deployment",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "Service",
    ]
    assert one(brought, "Role", PUBLISHER)
    assert pod(brought)["serviceAccountName"] == "x"
    with pytest.raises(HelmError, match=r"router\.serviceAccount\.name is required"):
        render(router(serviceAccount={"create": False}))


def test_the_operator_may_publish_the_routers_table_and_no_other_configmap() -> None:
    """The router follows the ConfigMap the operator writes: with the router, the operator's
    identity gets a Role in the allocation's namespace for that ConfigMap (create cannot be
    narrowed by name), whatever rbac.routingConfigMaps says; its ClusterRole is unchanged."""
    manifests = render(router(allocation={"name": "chat", "namespace": "serving"}))
    role = one(manifests, "Role", PUBLISHER)
    assert role["metadata"]["namespace"] == "serving"
    assert role["rules"] == publisher_rules("chat")
    binding = one(manifests, "RoleBinding", PUBLISHER)
    assert binding["metadata"]["namespace"] == "serving"
    assert binding["roleRef"]["name"] == PUBLISHER
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": FULLNAME, "namespace": RELEASE_NAMESPACE}
    ]
    assert one(manifests, "ClusterRole", FULLNAME)["rules"] == DEFAULT_RULES
    # The operator's RBAC is the user's: no Role for it.
    assert not find(
        render(
            {**ENABLED, "rbac": {"create": False}, "serviceAccount": {"create": False, "name": "x"}}
        ),
        "Role",
        PUBLISHER,
    )


def test_routing_config_maps_are_off_by_default_and_can_be_narrowed() -> None:
    """rbac.routingConfigMaps: publishing for every allocation the operator serves (the name
    the operator's Forbidden message gives)."""
    for manifest in render():
        for rule in manifest.get("rules", []):
            assert "configmaps" not in rule["resources"]
    rules = one(
        render({"rbac": {"routingConfigMaps": {"enabled": True}}}), "ClusterRole", FULLNAME
    )["rules"]
    assert rules == [
        *DEFAULT_RULES,
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "update", "delete"]},
    ]
    narrowed = {"enabled": True, "allocations": ["chat", "mixed"]}
    manifests = render({"watchNamespaces": ["team-a"], "rbac": {"routingConfigMaps": narrowed}})
    assert one(manifests, "Role", FULLNAME)["rules"][len(DEFAULT_RULES) :] == [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["chat-routing", "mixed-routing"],
            "verbs": ["get", "update", "delete"],
        },
    ]
    with pytest.raises(HelmError, match="at '/rbac/routingConfigMaps/allocations/0'"):
        render({"rbac": {"routingConfigMaps": {"allocations": ["Chat"]}}})
    with pytest.raises(HelmError, match="additional properties 'enable' not allowed"):
        render({"rbac": {"routingConfigMaps": {"enable": True}}})


def test_autoscaling_hands_the_replica_count_to_an_hpa() -> None:
    manifests = render(router(autoscaling={"enabled": True}))
    assert "replicas" not in one(manifests, "Deployment", ROUTER)["spec"]
    hpa = one(manifests, "HorizontalPodAutoscaler", ROUTER)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["metadata"]["labels"] == ROUTER_LABELS
    assert hpa["spec"] == {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": ROUTER},
        "minReplicas": 2,
        "maxReplicas": 10,
        "metrics": [
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": 70},
                },
            }
        ],
    }
    # replicaCount is not used then; the budget follows minReplicas.
    assert one(manifests, "PodDisruptionBudget", ROUTER)["spec"]["maxUnavailable"] == 1
    single = render(router(replicaCount=5, autoscaling={"enabled": True, "minReplicas": 1}))
    assert not find(single, "PodDisruptionBudget", ROUTER)
    assert "replicas" not in one(single, "Deployment", ROUTER)["spec"]

    behavior = {"scaleDown": {"stabilizationWindowSeconds": 600}}
    memory = {
        "enabled": True,
        "targetCPUUtilizationPercentage": None,
        "targetMemoryUtilizationPercentage": 80,
        "behavior": behavior,
    }
    spec = one(render(router(autoscaling=memory)), "HorizontalPodAutoscaler")["spec"]
    assert [m["resource"]["name"] for m in spec["metrics"]] == ["memory"]
    assert spec["behavior"] == behavior
    # Off: the Deployment has the count, and no HPA is rendered.
    assert one(render(ENABLED), "Deployment", ROUTER)["spec"]["replicas"] == 2
    assert not find(render(ENABLED), "HorizontalPodAutoscaler")


@pytest.mark.parametrize(
    ("autoscaling", "resources", "message"),
    [
        (
            {"minReplicas": 5, "maxReplicas": 3},
            None,
            r"minReplicas \(5\) is more than maxReplicas \(3\)",
        ),
        (
            {"targetCPUUtilizationPercentage": None},
            None,
            "set targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage",
        ),
        ({}, {"requests": None}, "needs router.resources.requests.cpu"),
        (
            {"targetMemoryUtilizationPercentage": 80},
            {"requests": {"cpu": "1", "memory": None}},
            "needs router.resources.requests.memory",
        ),
    ],
)
def test_an_hpa_that_cannot_work_is_refused(
    autoscaling: dict[str, Any], resources: dict[str, Any] | None, message: str
) -> None:
    values = router(autoscaling={"enabled": True, **autoscaling})
    if resources is not None:
        values["router"]["resources"] = resources
    with pytest.raises(HelmError, match=message):
        render(values)


def test_pod_disruption_budget_only_for_more_than_one_replica() -> None:
    assert one(render(ENABLED), "PodDisruptionBudget", ROUTER)["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": ROUTER_SELECTOR},
    }
    assert not find(render(router(replicaCount=1)), "PodDisruptionBudget", ROUTER)
    budget = router(podDisruptionBudget={"minAvailable": "50%"})
    assert one(render(budget), "PodDisruptionBudget", ROUTER)["spec"]["minAvailable"] == "50%"
    off = render(router(podDisruptionBudget={"enabled": False}))
    assert not find(off, "PodDisruptionBudget", ROUTER)
    # The operator's own budget is another object, on its own values.
    assert one(off, "PodDisruptionBudget", FULLNAME)


def test_service_monitor_scrapes_the_routers_metrics() -> None:
    assert not find(render(ENABLED, api_versions=[SERVICE_MONITOR_API]), "ServiceMonitor")
    relabelings = [{"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}]
    values = router(
        serviceMonitor={
            "enabled": True,
            "labels": {"release": "kube-prometheus-stack"},
            "interval": "15s",
            "scrapeTimeout": "10s",
            "relabelings": relabelings,
        }
    )
    monitor = one(render(values, api_versions=[SERVICE_MONITOR_API]), "ServiceMonitor", ROUTER)
    assert monitor["metadata"]["labels"] == {**ROUTER_LABELS, "release": "kube-prometheus-stack"}
    assert monitor["spec"] == {
        "selector": {"matchLabels": ROUTER_SELECTOR},
        "namespaceSelector": {"matchNames": [RELEASE_NAMESPACE]},
        "endpoints": [
            {
                "port": "http",
                "path": "/metrics",
                "interval": "15s",
                "scrapeTimeout": "10s",
                "honorLabels": False,
                "relabelings": relabelings,
            }
        ],
    }


def test_routing_options_become_flags() -> None:
    values = router(workers=4, trustMaxTokens=True, charsPerToken=3.5, extraArgs=["--seed=1"])
    assert container(render(values))["args"] == [
        *router_args("mixed", RELEASE_NAMESPACE, workers=4),
        "--trust-max-tokens",
        "--chars-per-token=3.5",
        "--seed=1",
    ]
    assert "--chars-per-token=4" in container(render(router(charsPerToken=4)))["args"]


def test_a_stopping_pod_drains_and_is_killed_only_after_its_timeout() -> None:
    """SIGTERM: the router serves on for drainSeconds, then its requests in flight have up to
    shutdownTimeoutSeconds; the kubelet's grace period must outlast both."""
    manifests = render(ENABLED)
    args = container(manifests)["args"]
    assert args[-2:] == ["--drain-seconds=5", "--shutdown-timeout=45"]
    assert pod(manifests)["terminationGracePeriodSeconds"] == 60 > 5 + 45
    assert "lifecycle" not in container(manifests)  # no preStop: the router drains by itself
    values = router(drainSeconds=0, shutdownTimeoutSeconds=300, terminationGracePeriodSeconds=310)
    manifests = render(values)
    assert container(manifests)["args"][-2:] == ["--drain-seconds=0", "--shutdown-timeout=300"]
    assert pod(manifests)["terminationGracePeriodSeconds"] == 310


@pytest.mark.parametrize(
    "values",
    [
        {"shutdownTimeoutSeconds": 55},  # 5 + 55 = 60: killed as the timeout ends
        {"terminationGracePeriodSeconds": 30},
        {"drainSeconds": 20, "shutdownTimeoutSeconds": 60, "terminationGracePeriodSeconds": 79},
    ],
)
def test_a_grace_period_within_drain_and_timeout_is_refused(values: dict[str, Any]) -> None:
    with pytest.raises(HelmError, match=r"router.terminationGracePeriodSeconds \(\d+\) must be"):
        render(router(**values))


def test_a_tokenizer_comes_from_a_config_map_or_a_volume() -> None:
    manifests = render(router(tokenizer={"configMap": "llama-tokenizer", "key": "llama.json"}))
    route = container(manifests)
    assert route["args"][len(ARGS) :] == ["--tokenizer=/etc/melange-router/tokenizer/llama.json"]
    assert route["volumeMounts"][1:] == [
        {"name": "tokenizer", "mountPath": "/etc/melange-router/tokenizer", "readOnly": True}
    ]
    assert pod(manifests)["volumes"][1:] == [
        {
            "name": "tokenizer",
            "configMap": {
                "name": "llama-tokenizer",
                "items": [{"key": "llama.json", "path": "llama.json"}],
            },
        }
    ]

    volume = {"name": "models", "persistentVolumeClaim": {"claimName": "models"}}
    mount = {"name": "models", "mountPath": "/models", "readOnly": True}
    manifests = render(
        router(
            tokenizer={"path": "/models/llama/tokenizer.json"},
            extraVolumes=[volume],
            extraVolumeMounts=[mount],
        )
    )
    route = container(manifests)
    assert route["args"][len(ARGS) :] == ["--tokenizer=/models/llama/tokenizer.json"]
    assert route["volumeMounts"][1:] == [mount]
    assert pod(manifests)["volumes"][1:] == [volume]

    with pytest.raises(HelmError, match="set configMap or path, not both"):
        render(router(tokenizer={"configMap": "t", "path": "/models/tokenizer.json"}))


def test_image_is_the_operators_unless_the_router_names_one() -> None:
    assert container(render({**ENABLED, "image": {"tag": "dev"}}))["image"] == (
        "melange-operator:dev"
    )
    own = router(image={"repository": "registry.example/route", "tag": "1.2"})
    assert container(render(own))["image"] == "registry.example/route:1.2"
    digest = "sha256:" + "cd" * 32
    pinned = router(image={"repository": "registry.example/route", "digest": digest})
    assert container(render(pinned))["image"] == f"registry.example/route@{digest}"


def test_every_router_value_reaches_its_object() -> None:
    values = yaml.safe_load(ROUTER_VALUES.read_text())
    settings = values["router"]
    manifests = render(values, api_versions=[SERVICE_MONITOR_API])
    routed = objects(manifests)
    assert kinds(routed) == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Role",
        "Role",
        "RoleBinding",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ]
    for manifest in routed:
        assert manifest["metadata"]["labels"]["team"] == "serving", manifest["kind"]
    deployment = one(manifests, "Deployment", ROUTER)
    assert "replicas" not in deployment["spec"]
    assert deployment["spec"]["selector"] == {"matchLabels": ROUTER_SELECTOR}
    template = deployment["spec"]["template"]
    assert template["metadata"]["labels"] == {**ROUTER_LABELS, "team": "serving", "tier": "edge"}
    assert template["metadata"]["annotations"] == settings["podAnnotations"]
    spec = template["spec"]
    assert spec["serviceAccountName"] == "llm-router"
    assert spec["imagePullSecrets"] == values["imagePullSecrets"]
    assert spec["priorityClassName"] == settings["priorityClassName"]
    assert spec["terminationGracePeriodSeconds"] == 120
    for key in ("nodeSelector", "tolerations", "topologySpreadConstraints"):
        assert spec[key] == settings[key], key
    assert spec["affinity"] == {**settings["affinity"], "nodeAffinity": OFF_GPUS}
    route = container(manifests)
    assert route["image"] == "registry.example.com/melange-operator-route:0.1.0-route"
    assert route["args"] == [
        *router_args("mixed", "serving", workers=2, drain=10, timeout=100),
        "--trust-max-tokens",
        "--tokenizer=/etc/melange-router/tokenizer/tokenizer.json",
        "--chars-per-token=3.5",
        "--connect-timeout=2",
    ]
    assert route["env"] == settings["env"]
    assert route["resources"] == settings["resources"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert {k: v for k, v in route[probe].items() if k != "httpGet"} == settings[probe]
    assert route["volumeMounts"][-1] == settings["extraVolumeMounts"][0]
    assert spec["volumes"][-1] == settings["extraVolumes"][0]

    hpa = one(manifests, "HorizontalPodAutoscaler", ROUTER)["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 12)
    assert [m["resource"]["target"]["averageUtilization"] for m in hpa["metrics"]] == [60, 80]
    assert hpa["behavior"] == settings["autoscaling"]["behavior"]
    assert one(manifests, "PodDisruptionBudget", ROUTER)["spec"]["minAvailable"] == 2
    service = one(manifests, "Service", ROUTER)
    assert service["metadata"]["annotations"] == settings["service"]["annotations"]
    assert service["spec"]["ports"][0]["port"] == 8000
    account = one(manifests, "ServiceAccount", "llm-router")
    assert account["metadata"]["annotations"] == settings["serviceAccount"]["annotations"]
    assert one(manifests, "Role", ROUTER)["metadata"]["namespace"] == "serving"
    (endpoint,) = one(manifests, "ServiceMonitor", ROUTER)["spec"]["endpoints"]
    assert endpoint["metricRelabelings"] == settings["serviceMonitor"]["metricRelabelings"]


def test_names_follow_the_release_and_fit_in_63_characters() -> None:
    manifests = render({**ENABLED, "fullnameOverride": "mo"})
    assert {m["metadata"]["name"] for m in objects(manifests)} == {
        "mo-router",
        "mo-router-publisher",
    }
    assert one(manifests, "Role", "mo-router")["rules"] == router_rules("mixed")
    long = render({**ENABLED, "fullnameOverride": "x" * 63})
    names = {m["metadata"]["name"] for m in objects(long)}
    assert names == {"x" * 56 + "-router", "x" * 56 + "-router-publisher"}
    renamed = render({**ENABLED, "nameOverride": "melange"})
    selector = one(renamed, "Deployment", "rel-melange-router")["spec"]["selector"]["matchLabels"]
    assert selector == {**ROUTER_SELECTOR, "app.kubernetes.io/name": "melange-router"}
    assert one(renamed, "Deployment", "rel-melange")["spec"]["selector"]["matchLabels"] == {
        **SELECTOR,
        "app.kubernetes.io/name": "melange",
    }
    assert LABELS["app.kubernetes.io/name"] != ROUTER_LABELS["app.kubernetes.io/name"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"router": {"enable": True}}, "at '/router': additional properties 'enable' not allowed"),
        (
            {"router": {"enabled": True}},
            "at '/router/allocation/name': minLength: got 0, want 1",
        ),
        (
            {"router": {"allocation": {"nme": "mixed"}}},
            "at '/router/allocation': additional properties 'nme' not allowed",
        ),
        ({"router": {"allocation": {"name": "Mixed_1"}}}, "at '/router/allocation/name'"),
        ({"router": {"allocation": {"namespace": "a.b"}}}, "at '/router/allocation/namespace'"),
        (
            {"router": {"autoscaling": {"targetCPUUtilization": 70}}},
            "at '/router/autoscaling': additional properties 'targetCPUUtilization' not allowed",
        ),
        ({"router": {"autoscaling": {"minReplicas": 0}}}, "at '/router/autoscaling/minReplicas'"),
        (
            {"router": {"autoscaling": {"targetCPUUtilizationPercentage": "70%"}}},
            "at '/router/autoscaling/targetCPUUtilizationPercentage'",
        ),
        ({"router": {"replicas": 2}}, "additional properties 'replicas' not allowed"),
        ({"router": {"replicaCount": -1}}, "at '/router/replicaCount'"),
        ({"router": {"workers": 0}}, "at '/router/workers'"),
        ({"router": {"drainSeconds": -1}}, "at '/router/drainSeconds'"),
        ({"router": {"drainSeconds": 2.5}}, "at '/router/drainSeconds'"),
        ({"router": {"shutdownTimeoutSeconds": "30s"}}, "at '/router/shutdownTimeoutSeconds'"),
        (
            {"router": {"terminationGracePeriodSeconds": 0}},
            "at '/router/terminationGracePeriodSeconds'",
        ),
        ({"router": {"charsPerToken": 0}}, "at '/router/charsPerToken'"),
        ({"router": {"tokenizer": {"path": "tokenizer.json"}}}, "at '/router/tokenizer/path'"),
        (
            {"router": {"tokenizer": {"configmap": "t"}}},
            "additional properties 'configmap' not allowed",
        ),
        ({"router": {"service": {"port": 0}}}, "at '/router/service/port'"),
        ({"router": {"service": {"type": "LoadBalancer"}}}, "additional properties 'type'"),
        (
            {"router": {"podDisruptionBudget": {"maxUnavailable": "half"}}},
            "at '/router/podDisruptionBudget/maxUnavailable'",
        ),
        (
            {"router": {"serviceMonitor": {"enable": True}}},
            "at '/router/serviceMonitor': additional properties 'enable' not allowed",
        ),
        (
            {"router": {"serviceMonitor": {"interval": "30"}}},
            "at '/router/serviceMonitor/interval'",
        ),
        (
            {"router": {"serviceMonitor": {"relabelings": [{"sourceLabel": ["pod"]}]}}},
            "at '/router/serviceMonitor/relabelings/0'",
        ),
        (
            {"router": {"serviceAccount": {"annotation": {}}}},
            "at '/router/serviceAccount': additional properties 'annotation' not allowed",
        ),
        ({"router": {"rbac": {"create": "yes"}}}, "at '/router/rbac/create'"),
        ({"router": {"resources": {"request": {}}}}, "at '/router/resources'"),
        (
            {"router": {"readinessProbe": {"periodSeconds": 0}}},
            "at '/router/readinessProbe/periodSeconds'",
        ),
        ({"router": {"tolerations": [{"operator": "In"}]}}, "at '/router/tolerations/0/operator'"),
        ({"router": {"affinity": {"nodeAfinity": {}}}}, "at '/router/affinity'"),
        ({"router": {"env": [{"value": "x"}]}}, "at '/router/env/0': missing property 'name'"),
        ({"router": {"extraArgs": "--seed=1"}}, "at '/router/extraArgs'"),
        ({"router": {"podLabels": {"tier": 1}}}, "at '/router/podLabels/tier'"),
    ],
)
def test_schema_rejects_bad_router_values_naming_the_key(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(HelmError) as error:
        render(values)
    assert "values don't meet the specifications of the schema" in str(error.value)
    assert message in str(error.value)
