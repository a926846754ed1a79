"""200 allocations across 10 namespaces on one operator: all Ready, every pool at its plan, and
nothing patched once they are; the time, memory and request rate are printed (measured, not
asserted: `benchmarks/scale.py` is the benchmark)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.controlplane.harness import AUDIT_POLICY_ALL_REQUESTS, ControlPlane

from .scale import measure

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

RESYNC = 10.0


@pytest.fixture(scope="module")
def counting_control_plane() -> Iterator[ControlPlane]:
    """A control plane of its own that audits reads too (the shared one records writes only)."""
    with ControlPlane(audit=True, audit_policy=AUDIT_POLICY_ALL_REQUESTS) as cp:
        yield cp


def test_200_allocations_in_10_namespaces_all_reach_their_plan(
    counting_control_plane: ControlPlane, tmp_path: Path
) -> None:
    result = measure(
        counting_control_plane, tmp_path, namespaces=10, per_namespace=20, resync=RESYNC, window=20
    )
    print(result.report(RESYNC))
    assert result.not_at_plan == []
    assert result.pool_writes_while_steady == 0
    # the steady window saw the operator at work (it reads every pool at each resync)
    assert result.requests["get"] > 0
