"""The shipped examples: up to date with the profile library, valid, and solvable."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from melange import api
from melange.plan import solver

EXAMPLES = Path(__file__).parents[2] / "examples"


def _builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("examples_build", EXAMPLES / "build.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_examples_match_their_generator() -> None:
    for path, text in _builder().files().items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.name} is stale: run examples/build.py"
        )


@pytest.mark.parametrize("name", ["conversational", "document", "mixed"])
def test_example_solves_and_beats_or_ties_single_types(name: str) -> None:
    allocation = api.load_text((EXAMPLES / f"{name}.yaml").read_text(), name)
    plan = solver.solve_spec(allocation.spec)
    assert plan.status == "Optimal"
    assert plan.saving is not None
    assert plan.saving >= 0
    assert all(g.scale_target_ref is not None for g in allocation.spec.gpus)


def test_mixed_example_uses_several_gpu_types() -> None:
    """The point of the method: a mixed workload is served cheapest by a mix."""
    allocation = api.load_text((EXAMPLES / "mixed.yaml").read_text(), "mixed")
    plan = solver.solve_spec(allocation.spec)
    assert sum(1 for g in plan.gpus if g.replicas > 0) >= 2
