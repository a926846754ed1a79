"""The shipped examples: up to date with the profile library, valid, solvable, and independent of
each other (no two name the same node pool), with the pools of the plain-cluster ones shipped; and
the request-log generator of the docs' recipe (examples/request_log.py, a script, not a built file)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from melange import api
from melange.plan import solver
from melange.tools import perfmodel

EXAMPLES = Path(__file__).parents[2] / "examples"
NAMES = ["conversational", "document", "mixed"]
# the variants' subdirectories ("" for the top level): the kind every scaleTargetRef names
VARIANTS = {
    "": ("apps/v1", "Deployment"),
    "cluster-api": ("cluster.x-k8s.io/v1beta1", "MachineDeployment"),
    "karpenter": ("karpenter.sh/v1", "NodePool"),
}
ALLOCATIONS = [EXAMPLES / variant / f"{name}.yaml" for variant in VARIANTS for name in NAMES]


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _builder() -> ModuleType:
    return _script("build")


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


def test_request_log_generator_is_deterministic_for_a_seed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    generator = _script("request_log")
    log = "".join(generator.lines(500, 12.0, 7))
    assert log == "".join(generator.lines(500, 12.0, 7))
    assert log != "".join(generator.lines(500, 12.0, 8))
    assert generator.main(["--requests", "500", "--rate", "12", "--seed", "7"]) == 0
    assert capsys.readouterr().out == log
    requests = [json.loads(line) for line in log.splitlines()]
    assert len(requests) == 500
    times = [r["timestamp"] for r in requests]
    assert times == sorted(times)
    assert all(r["usage"]["prompt_tokens"] >= 1 for r in requests)
    assert all(r["usage"]["completion_tokens"] >= 1 for r in requests)


def test_melange_workload_reads_the_generated_log(tmp_path: Path) -> None:
    log = "".join(_script("request_log").lines(500, 12.0, 7))
    sizes = [json.loads(line)["usage"] for line in log.splitlines()]
    last_input, last_output = perfmodel.DEFAULT_INPUT_EDGES[-1], perfmodel.DEFAULT_OUTPUT_EDGES[-1]
    inside = sum(
        1 for u in sizes if u["prompt_tokens"] < last_input and u["completion_tokens"] < last_output
    )
    melange = shutil.which("melange", path=str(Path(sys.executable).parent)) or "melange"
    args = ["workload", "-", "--edges-from", "llama-3.1-8b/l4/tpot-120ms"]
    result = subprocess.run(
        [melange, *args, "--profiles-dir", str(tmp_path)],
        input=log,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "500 requests" in result.stdout
    block = yaml.safe_load(result.stdout)
    assert block["buckets"]["inputTokens"] == list(perfmodel.DEFAULT_INPUT_EDGES)
    assert block["buckets"]["outputTokens"] == list(perfmodel.DEFAULT_OUTPUT_EDGES)
    assert 0 < inside < 500  # a few requests fall beyond the last edges
    assert sum(map(sum, block["workload"]["distribution"])) == inside
    assert 9 < block["workload"]["totalRate"] < 15  # about the generator's 12 req/s
