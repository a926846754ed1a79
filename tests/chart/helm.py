"""The real helm binary (built by tests/controlplane/build.sh) driven from tests: render, lint, install."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.controlplane.harness import BUILD_HINT, MissingBinaryError, default_bin_dir

REPO = Path(__file__).parents[2]
CHART = REPO / "charts" / "melange-operator"
RELEASE = "rel"
RELEASE_NAMESPACE = "ops"
FULLNAME = f"{RELEASE}-melange-operator"

Manifest = dict[str, Any]


class HelmError(RuntimeError):
    """helm exited non-zero; the message holds its stderr."""


def helm_binary() -> Path:
    path = default_bin_dir() / "current" / "helm"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise MissingBinaryError(f"missing test binary: helm (expected at {path}); {BUILD_HINT}")
    return path


def helm(*args: str, env: Mapping[str, str] | None = None, timeout: float = 120) -> str:
    """Run helm; return its stdout, or raise HelmError with its stderr."""
    # HELM_* state directories in a scratch place, so no user configuration or cache leaks in.
    scratch = Path(tempfile.gettempdir()) / "melange-helm-test"
    environment = {
        **(env if env is not None else os.environ),
        "HELM_CACHE_HOME": str(scratch / "cache"),
        "HELM_CONFIG_HOME": str(scratch / "config"),
        "HELM_DATA_HOME": str(scratch / "data"),
    }
    result = subprocess.run(
        [str(helm_binary()), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise HelmError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result.stdout


def values_args(values: Mapping[str, Any] | None, directory: Path) -> list[str]:
    """`--values FILE` for a mapping (written as YAML), so lists and maps need no --set quoting."""
    if not values:
        return []
    handle, name = tempfile.mkstemp(prefix="values-", suffix=".yaml", dir=directory)
    with os.fdopen(handle, "w") as file:
        yaml.safe_dump(dict(values), file)
    return ["--values", name]


def render(
    values: Mapping[str, Any] | None = None,
    *,
    api_versions: Iterable[str] = (),
    include_crds: bool = False,
) -> list[Manifest]:
    """`helm template` of the chart as release `rel` in namespace `ops`, parsed."""
    args = ["template", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE]
    args += [f"--api-versions={v}" for v in api_versions]
    if include_crds:
        args.append("--include-crds")
    with tempfile.TemporaryDirectory() as directory:
        out = helm(*args, *values_args(values, Path(directory)))
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(manifests: Iterable[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [
        m
        for m in manifests
        if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)
    ]


def one(manifests: Iterable[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = find(manifests, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kinds(manifests: Iterable[Manifest]) -> list[str]:
    return sorted(m["kind"] for m in manifests)
