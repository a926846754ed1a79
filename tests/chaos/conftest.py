"""Chaos fixtures: an operator per test on the session's control plane (scenarios that stop the
control plane itself start their own)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.controlplane.harness import ControlPlane
from tests.e2e.kube import Kube
from tests.e2e.operator_process import OperatorProcess

RESYNC = 3  # the operator's --resync-seconds in these scenarios


@pytest.fixture
def operator(
    control_plane: ControlPlane, kube: Kube, namespace: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    process = OperatorProcess(
        control_plane, namespace, tmp_path, extra_args=("--resync-seconds", str(RESYNC))
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()
        print(f"--- operator log (tail) ---\n{process.log()[-8000:]}")
