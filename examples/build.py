"""Write the example allocations from the shipped profiles: `python examples/build.py`.

The examples are data, but built rather than typed so that they always match the profile library;
tests/unit/test_examples.py checks the files equal what this script writes. Each workload comes in
three variants, which differ only in the kind of node pool each GPU type's `scaleTargetRef` names:

- `examples/<name>.yaml`: `Deployment`s, with the Deployments themselves in
  `examples/pools/<name>.yaml`, so that both apply to any cluster;
- `examples/cluster-api/<name>.yaml`: Cluster API `MachineDeployment`s in the allocation's namespace;
- `examples/karpenter/<name>.yaml`: Karpenter `NodePool`s (cluster-scoped).

Every pool is named `<name>-<gpu>` (`mixed-a10g`), so no two examples name the same pool.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from melange.tools import perfmodel, profiles

HERE = Path(__file__).parent
GPUS = ("l4", "a10g", "l40s", "a100-80gb", "h100")
SLO = "tpot-120ms"
# Spare capacity: each GPU type is sized for 1.2x its share of the traffic, so no instance is
# planned above 1/1.2 = 83% of its profiled throughput. That leaves room for bursts between
# re-solves and for the profiles being estimates (without it, a plan fills instances to 100%).
HEADROOM = 0.2

# Marginal shares per input bucket (1,25,100,250,500,1000,2000,4000,8000) and output bucket
# (1,25,100,250,500,1000,2000); a workload's matrix is their outer product.
WORKLOADS: dict[str, dict[str, Any]] = {
    "conversational": {
        "about": "chat: short prompts, short to medium answers",
        "rate": 60.0,
        "input": [0.10, 0.35, 0.30, 0.15, 0.07, 0.03, 0.0, 0.0],
        "output": [0.10, 0.35, 0.35, 0.15, 0.05, 0.0],
    },
    "document": {
        "about": "summarisation and RAG: long prompts, short answers",
        "rate": 10.0,
        "input": [0.0, 0.0, 0.02, 0.05, 0.13, 0.30, 0.35, 0.15],
        "output": [0.05, 0.40, 0.40, 0.15, 0.0, 0.0],
    },
    "mixed": {
        "about": "a mix of chat, code completion and document traffic",
        "rate": 30.0,
        "input": [0.08, 0.20, 0.20, 0.15, 0.12, 0.10, 0.10, 0.05],
        "output": [0.08, 0.25, 0.30, 0.20, 0.12, 0.05],
    },
}

# variant (its subdirectory of examples/; "" for the top level) -> the node-pool kind, and what the
# file's header says about its pools
VARIANTS: dict[str, dict[str, str]] = {
    "": {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "pools": (
            "Deployments in its namespace, in examples/pools/{name}.yaml; on any cluster:\n"
            "#   kubectl apply -n serving -f examples/pools/{name}.yaml -f examples/{name}.yaml"
        ),
    },
    "cluster-api": {
        "apiVersion": "cluster.x-k8s.io/v1beta1",
        "kind": "MachineDeployment",
        "pools": "Cluster API MachineDeployments in its namespace, one per GPU type:\n#   {pools}",
    },
    "karpenter": {
        "apiVersion": "karpenter.sh/v1",
        "kind": "NodePool",
        "pools": (
            "Karpenter NodePools, cluster-scoped (the chart needs\n"
            "# clusterScopedTargets: [nodepools.karpenter.sh]), one per GPU type:\n#   {pools}"
        ),
    },
}

PAUSE_IMAGE = "registry.k8s.io/pause:3.10"


def pool_name(name: str, gpu: str) -> str:
    return f"{name}-{gpu}"


def manifest(name: str, workload: dict[str, Any], variant: str = "") -> dict[str, Any]:
    kind = VARIANTS[variant]
    gpus = []
    for gpu in GPUS:
        profile = profiles.load_profile(f"{perfmodel.SHIPPED_MODEL}/{gpu}/{SLO}")
        gpus.append(
            {
                **profiles.gpu_entry(profile),
                "minReplicas": 0,
                "maxReplicas": 32,
                "scaleTargetRef": {
                    "apiVersion": kind["apiVersion"],
                    "kind": kind["kind"],
                    "name": pool_name(name, gpu),
                },
            }
        )
    distribution = [[round(a * b, 4) for b in workload["output"]] for a in workload["input"]]
    return {
        "apiVersion": "melange.dev/v1alpha1",
        "kind": "MelangeAllocation",
        "metadata": {
            "name": f"llama-{name}",
            "annotations": {
                "melange.dev/about": f"{workload['about']}; {perfmodel.SHIPPED_MODEL} at {SLO}",
                "melange.dev/profiles": f"{perfmodel.SHIPPED_MODEL}/*/{SLO} (estimates)",
            },
        },
        "spec": {
            "buckets": {
                "inputTokens": list(perfmodel.DEFAULT_INPUT_EDGES),
                "outputTokens": list(perfmodel.DEFAULT_OUTPUT_EDGES),
            },
            "workload": {"distribution": distribution, "totalRate": workload["rate"]},
            "sliceFactor": 8,
            "headroom": HEADROOM,
            "gpus": gpus,
        },
    }


def pool_deployment(name: str, gpu: str, gpu_name: str) -> dict[str, Any]:
    """One GPU type's stand-in pool: a Deployment of pause containers, without `spec.replicas`
    (the operator sets it, and applying the file again does not reset it)."""
    labels = {"app.kubernetes.io/name": pool_name(name, gpu), "melange.dev/gpu": gpu_name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": pool_name(name, gpu),
            "labels": {**labels, "app.kubernetes.io/part-of": f"llama-{name}"},
        },
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": pool_name(name, gpu)}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 65535,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "server",
                            "image": PAUSE_IMAGE,
                            "resources": {
                                "requests": {"cpu": "1m", "memory": "8Mi"},
                                "limits": {"memory": "16Mi"},
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }
                    ],
                },
            },
        },
    }


class _FlowRows(yaml.SafeDumper):
    """Block style for the document, flow style for matrix rows (so a row is one line)."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(isinstance(v, int | float) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowRows.add_representer(list, _represent_list)


def _dump(documents: list[dict[str, Any]]) -> str:
    return yaml.dump_all(documents, Dumper=_FlowRows, sort_keys=False, width=120)


def render(name: str, variant: str = "") -> str:
    allocation = manifest(name, WORKLOADS[name], variant)
    pools = ", ".join(g["scaleTargetRef"]["name"] for g in allocation["spec"]["gpus"])
    about = VARIANTS[variant]["pools"].format(name=name, pools=pools)
    return (
        "# Generated by examples/build.py from the shipped profiles; `melange solve` it.\n"
        f"# Node pools: {about}\n{_dump([allocation])}"
    )


def render_pools(name: str) -> str:
    allocation = manifest(name, WORKLOADS[name])
    deployments = [
        pool_deployment(name, gpu, entry["name"])
        for gpu, entry in zip(GPUS, allocation["spec"]["gpus"], strict=True)
    ]
    return (
        f"# Generated by examples/build.py: the node pools of examples/{name}.yaml, one Deployment\n"
        "# per GPU type, so that the example runs on any cluster. Each replica here is a pause\n"
        "# container; in a real cluster it is the model server on that GPU type (a nodeSelector\n"
        "# for the GPU and resources.limits nvidia.com/gpu). Apply with the allocation:\n"
        f"#   kubectl apply -n serving -f examples/pools/{name}.yaml -f examples/{name}.yaml\n"
    ) + _dump(deployments)


def files() -> dict[Path, str]:
    result = {}
    for name in WORKLOADS:
        for variant in VARIANTS:
            result[HERE / variant / f"{name}.yaml"] = render(name, variant)
        result[HERE / "pools" / f"{name}.yaml"] = render_pools(name)
    return result


def main() -> int:
    for path, text in files().items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(path.relative_to(HERE.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
