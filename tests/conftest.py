"""Session fixtures shared by the end-to-end suites (tests/e2e, tests/chart): one real control plane."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import settings

from tests.controlplane.harness import ControlPlane
from tests.e2e.kube import CRD_FILE, MANIFESTS, Kube

# In CI every property test draws the same examples each run (a failure there reproduces anywhere);
# elsewhere they explore. Every counterexample found is pinned with @example where it failed.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    with ControlPlane(audit=True) as cp:
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
