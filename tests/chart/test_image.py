"""The container image: the Dockerfile's shape, and its build and install steps run for real.

There is no container engine here, so the test runs the Dockerfile's own RUN commands (read from the
file, not copied into the test) in a scratch directory laid out like the build context: the wheels
are built by scripts/build-wheels.sh from only the files the Dockerfile copies, then installed into
a fresh virtual environment the way the final stage installs them, without an index.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .helm import REPO, one, render

DOCKERFILE = REPO / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, each a list of (INSTRUCTION, arguments)."""
    text = re.sub(r"\s*\\\n\s*", " ", text)  # line continuations
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert match, line
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], match.group(1))
            stages.append(Stage(base, match.group(2)))
        elif keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def test_dockerfile_builds_wheels_then_installs_only_them() -> None:
    args, stages = parse_dockerfile(DOCKERFILE.read_text())
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", args["PYTHON_IMAGE"])
    build, final = stages
    assert (build.base, build.name) == (args["PYTHON_IMAGE"], "build")
    assert (final.base, final.name) == (args["PYTHON_IMAGE"], None)

    assert build.all("RUN") == ["sh scripts/build-wheels.sh /wheels"]
    # The final stage copies nothing in and installs the wheels only: no index, no compiler.
    assert not final.all("COPY")
    assert not final.all("ADD")
    [install] = final.all("RUN")
    assert install == (
        "--mount=type=bind,from=build,source=/wheels,target=/wheels "
        "python -m pip install --no-index --find-links=/wheels melange-operator"
    )

    # The chart runs the image as it is meant to run: same user, same command.
    pod = one(render(), "Deployment")["spec"]["template"]["spec"]
    assert final.all("USER") == [
        f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    ]
    [entrypoint] = final.all("ENTRYPOINT")
    assert json.loads(entrypoint) == pod["containers"][0]["command"] == ["melange", "run"]

    # The build context admits what the build stage copies.
    admitted = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    sources = {src.rstrip("/") for copy in build.all("COPY") for src in copy.split()[:-1]}
    assert sources == admitted


def _context(build: Stage, root: Path) -> Path:
    """Lay out the build stage's WORKDIR with exactly what its COPY instructions copy."""
    [workdir] = build.all("WORKDIR")
    target = root / workdir.lstrip("/")
    target.mkdir(parents=True)
    for copy in build.all("COPY"):
        *sources, destination = copy.split()
        for source in sources:
            origin = REPO / source
            dest = target / destination
            if origin.is_dir():
                shutil.copytree(
                    origin, dest, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
                )
            else:
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, dest / origin.name)
    return target


def test_image_build_and_install_steps_give_a_working_melange(tmp_path: Path) -> None:
    _, (build, final) = parse_dockerfile(DOCKERFILE.read_text())
    source = _context(build, tmp_path / "context")
    wheels = tmp_path / "wheels"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {
        **os.environ,
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    env.pop("PYTHONPATH", None)

    def run(command: str, cwd: Path) -> None:
        command = command.replace("/wheels", str(wheels))
        result = subprocess.run(
            ["sh", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"

    [build_wheels] = build.all("RUN")
    run(build_wheels, source)
    built = sorted(p.name for p in wheels.iterdir())
    assert all(name.endswith(".whl") for name in built)
    assert "melange_operator-0.1.0-py3-none-any.whl" in built

    [install] = final.all("RUN")
    run(re.sub(r"--mount=\S+\s+", "", install), tmp_path)

    melange = venv / "bin" / "melange"
    version = subprocess.run(
        [str(melange), "--version"], capture_output=True, text=True, check=True, env=env
    )
    assert version.stdout.strip() == "melange, version 0.1.0"
    solved = subprocess.run(
        [str(melange), "solve", str(REPO / "examples" / "mixed.yaml"), "-o", "yaml"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=tmp_path,
    )
    assert yaml.safe_load(solved.stdout)["status"] == "Optimal"
    # `melange run` imports the operator's modules (Kopf, the Kubernetes client) at start.
    subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import melange.controller.kube.handlers"],
        check=True,
        env=env,
        cwd=tmp_path,
    )
