"""End-to-end fixtures: one real control plane per session, a namespace and an operator per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.controlplane.harness import ControlPlane

from .kube import CRD_FILE, MANIFESTS, Kube
from .operator_process import OperatorProcess


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    with ControlPlane() as cp:
        yield cp


@pytest.fixture(scope="session")
def kube(control_plane: ControlPlane) -> Kube:
    """A client with the CRDs installed and established."""
    k = Kube(control_plane.kubeconfig_path)
    for document in [*k.apply_file(CRD_FILE), *k.apply_file(MANIFESTS / "test-targets.yaml")]:
        k.wait_established(document["metadata"]["name"])
    return k


@pytest.fixture
def namespace(kube: Kube) -> str:
    name = f"t-{uuid.uuid4().hex[:10]}"
    kube.create_namespace(name)
    return name


@pytest.fixture
def operator(
    control_plane: ControlPlane, kube: Kube, namespace: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    process = OperatorProcess(control_plane, namespace, tmp_path)
    process.start()
    try:
        yield process
    finally:
        process.stop()
        print(f"--- operator log (tail) ---\n{process.log()[-8000:]}")
