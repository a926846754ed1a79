"""The shipped examples: up to date with the profile library, valid, solvable, and independent of
each other (no two name the same node pool), with the pools of the plain-cluster ones shipped."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from melange import api
from melange.plan import solver

EXAMPLES = Path(__file__).parents[2] / "examples"
NAMES = ["conversational", "document", "mixed"]
# the variants' subdirectories ("" for the top level): the kind every scaleTargetRef names
VARIANTS = {
    "": ("apps/v1", "Deployment"),
    "cluster-api": ("cluster.x-k8s.io/v1beta1", "MachineDeployment"),
    "karpenter": ("karpenter.sh/v1", "NodePool"),
}
ALLOCATIONS = [EXAMPLES / variant / f"{name}.yaml" for variant in VARIANTS for name in NAMES]


def _builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("examples_build", EXAMPLES / "build.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _label(path: Path) -> str:
    return str(path.relative_to(EXAMPLES))


def _targets(path: Path) -> list[dict[str, str]]:
    allocation = api.load_text(path.read_text(), _label(path))
    return [
        g.scale_target_ref.model_dump(by_alias=True, exclude_none=True)
        for g in allocation.spec.gpus
        if g.scale_target_ref is not None
    ]


def test_examples_match_their_generator() -> None:
    built = _builder().files()
    for path, text in built.items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{_label(path)} is stale: run examples/build.py"
        )
    shipped = set(EXAMPLES.glob("**/*.yaml"))
    assert shipped == set(built), f"not built by examples/build.py: {shipped - set(built)}"


@pytest.mark.parametrize("path", ALLOCATIONS, ids=_label)
def test_example_solves_and_beats_or_ties_single_types(path: Path) -> None:
    allocation = api.load_text(path.read_text(), _label(path))
    plan = solver.solve_spec(allocation.spec)
    assert plan.status == "Optimal"
    assert plan.saving is not None
    assert plan.saving >= 0
    assert allocation.spec.headroom == pytest.approx(0.2)  # no instance planned above 83%
    assert all(g.utilization <= 1 / 1.2 + 1e-9 for g in plan.gpus)


@pytest.mark.parametrize("path", ALLOCATIONS, ids=_label)
def test_example_names_one_pool_per_gpu_type_of_its_variant(path: Path) -> None:
    variant = "" if path.parent == EXAMPLES else path.parent.name
    api_version, kind = VARIANTS[variant]
    targets = _targets(path)
    assert len(targets) == 5
    for target in targets:
        assert (target["apiVersion"], target["kind"]) == (api_version, kind)
        assert target["name"].startswith(f"{path.stem}-"), target  # e.g. mixed-a10g


def test_no_two_examples_name_the_same_pool() -> None:
    """Applying two examples (in one namespace, or any two with cluster-scoped NodePools) must
    not make them fight over a pool: every (kind, name) is named by one example only."""
    keys = Counter(
        (t["apiVersion"].rpartition("/")[0], t["kind"], t["name"])  # group, kind, name
        for path in ALLOCATIONS
        for t in _targets(path)
    )
    assert keys, "no scale targets found"
    assert [key for key, count in keys.items() if count > 1] == []
    names = {name: {t["name"] for t in _targets(EXAMPLES / f"{name}.yaml")} for name in NAMES}
    for a in NAMES:
        for b in NAMES:
            assert a == b or not names[a] & names[b], (a, b)


@pytest.mark.parametrize("name", NAMES)
def test_plain_example_ships_its_pools(name: str) -> None:
    """`examples/pools/<name>.yaml` holds exactly the Deployments the allocation scales, without
    `spec.replicas` (the operator owns it; applying the file again does not reset it)."""
    pools: list[dict[str, Any]] = [
        d for d in yaml.safe_load_all((EXAMPLES / "pools" / f"{name}.yaml").read_text()) if d
    ]
    assert [(d["apiVersion"], d["kind"]) for d in pools] == [("apps/v1", "Deployment")] * 5
    assert [d["metadata"]["name"] for d in pools] == [
        t["name"] for t in _targets(EXAMPLES / f"{name}.yaml")
    ]
    for deployment in pools:
        assert "replicas" not in deployment["spec"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()


def test_mixed_example_uses_several_gpu_types() -> None:
    """The point of the method: a mixed workload is served cheapest by a mix."""
    allocation = api.load_text((EXAMPLES / "mixed.yaml").read_text(), "mixed")
    plan = solver.solve_spec(allocation.spec)
    assert sum(1 for g in plan.gpus if g.replicas > 0) >= 2
