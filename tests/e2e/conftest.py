"""End-to-end fixtures: an operator per test (the control plane, `kube` and `namespace` fixtures are
in tests/conftest.py, shared with the chart tests)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.controlplane.harness import ControlPlane

from .kube import Kube, eventually
from .operator_process import OperatorProcess
from .prometheus import LoadEmitter, PrometheusServer


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


# -- a real Prometheus scraping a vLLM-like load emitter ----------------------------------------

EMITTER_RATE = 34.0


@pytest.fixture
def emitter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LoadEmitter]:
    """vLLM's metrics at a request rate the test sets (34 req/s to start).

    Parametrize indirectly with "text" for a Prometheus that stores `vllm:` names (the default,
    "negotiate", gives `vllm_` names with this Prometheus).
    """
    process = LoadEmitter(tmp_path, EMITTER_RATE, fmt=getattr(request, "param", "negotiate"))
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def prometheus(emitter: LoadEmitter, tmp_path: Path) -> Iterator[PrometheusServer]:
    """Prometheus scraping the emitter every second, ready once it sees the emitter's rate."""
    server = PrometheusServer(tmp_path / "prometheus", [emitter.address])
    server.start()
    try:
        query = f"sum(rate({emitter.metric_name}[4s]))"
        server.wait_for_value(query)
        eventually(
            lambda: _assert_near(server.value(query), EMITTER_RATE), timeout=30, interval=0.5
        )
        yield server
    finally:
        server.stop()
        print(f"--- prometheus log (tail) ---\n{server.log()[-4000:]}")


def _assert_near(value: float | None, expected: float) -> None:
    assert value is not None
    assert abs(value - expected) <= 0.02 * expected, value
