"""End-to-end check that the built control plane is a usable Kubernetes API.

Why: every operator e2e test builds on this harness, so this test pins down the
three things they rely on: the kubeconfig works with the official Python client
(TLS verified against the generated CA, token auth under RBAC), the ``/scale``
subresource of an apps/v1 Deployment accepts patches with no controllers
running, and the binary is the version build.sh pinned (so Helm's
``kubeVersion`` checks and ``/version`` see a real semver).
"""

from __future__ import annotations

import re
import subprocess
import uuid
from pathlib import Path

import pytest
from kubernetes import client, config

from .harness import ControlPlane

BUILD_SH = Path(__file__).with_name("build.sh")


def _pinned_versions() -> dict[str, str]:
    """The versions build.sh pins (``build.sh --print-versions``), the single source of truth."""
    out = subprocess.run(
        ["bash", str(BUILD_SH), "--print-versions"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.mark.e2e
def test_deployment_scale_subresource_round_trip() -> None:
    pinned = _pinned_versions()
    k8s_version = pinned["K8S_VERSION"]

    with ControlPlane() as cp:
        assert cp.version() == f"Kubernetes {k8s_version}", (
            f"{cp.kube_apiserver} is not the pinned build; rerun bash {BUILD_SH}"
        )
        api = config.new_client_from_config(config_file=str(cp.kubeconfig_path))
        try:
            served = client.VersionApi(api).get_code()
            assert served.git_version == k8s_version
            assert (served.major, served.minor) == ("1", k8s_version.split(".")[1])

            namespace = f"melange-e2e-{uuid.uuid4().hex[:8]}"
            client.CoreV1Api(api).create_namespace(
                client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace))
            )
            labels = {"app": "vllm"}
            deployment = client.V1Deployment(
                metadata=client.V1ObjectMeta(name="vllm", labels=labels),
                spec=client.V1DeploymentSpec(
                    replicas=1,
                    selector=client.V1LabelSelector(match_labels=labels),
                    template=client.V1PodTemplateSpec(
                        metadata=client.V1ObjectMeta(labels=labels),
                        spec=client.V1PodSpec(
                            containers=[client.V1Container(name="vllm", image="vllm/vllm:test")]
                        ),
                    ),
                ),
            )
            apps = client.AppsV1Api(api)
            apps.create_namespaced_deployment(namespace, deployment)

            patched = apps.patch_namespaced_deployment_scale(
                "vllm", namespace, {"spec": {"replicas": 3}}
            )
            assert patched.spec is not None
            assert patched.spec.replicas == 3

            scale = apps.read_namespaced_deployment_scale("vllm", namespace)
            assert scale.spec is not None
            assert scale.spec.replicas == 3
            # The scale subresource writes through to the Deployment itself.
            assert apps.read_namespaced_deployment("vllm", namespace).spec.replicas == 3
        finally:
            api.close()

    # After exit both servers are gone (nothing left listening on the port).
    assert re.fullmatch(r"https://127\.0\.0\.1:\d+", cp.server)
    assert not cp.workdir.exists()
