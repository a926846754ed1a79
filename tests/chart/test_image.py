"""The container image: the Dockerfile's shape, its lock file, and its build and install steps run
for real.

There is no container engine here, so the tests run the Dockerfile's own RUN commands (read from
the file, not copied into the tests) in a scratch directory laid out like the build context: the
build stage downloads the locked wheels (hashes checked) and builds the project's wheel from only
the files the Dockerfile copies; the final stage's step installs them into a fresh virtual
environment, without an index.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from .helm import REPO, one, render

DOCKERFILE = REPO / "Dockerfile"
LOCK = REPO / "requirements" / "operator.lock"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
OCI = "org.opencontainers.image."


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


def stage_args(stage: Stage) -> dict[str, str]:
    """A stage's own ARGs and their defaults."""
    return {
        name: " ".join(shlex.split(default))
        for name, _, default in (arg.partition("=") for arg in stage.all("ARG"))
    }


def labels(stage: Stage) -> dict[str, str]:
    """A stage's LABELs, as written (`${ARG}` references not expanded)."""
    pairs = [word.partition("=") for label in stage.all("LABEL") for word in shlex.split(label)]
    return {key: value for key, _, value in pairs}


@dataclass(frozen=True)
class Pin:
    version: str
    hashes: tuple[str, ...]


def parse_lock(text: str) -> dict[str, Pin]:
    """The lock's pins by canonical name: `name==version` with its `--hash=sha256:...` options."""
    text = re.sub(r"\s*\\\n\s*", " ", text)
    pins: dict[str, Pin] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, *options = line.split()
        name, _, version = requirement.partition("==")
        assert version, f"not pinned: {line}"
        hashes = tuple(o.removeprefix("--hash=") for o in options)
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), line
        pins[canonicalize_name(name)] = Pin(version, hashes)
    return pins


def test_dockerfile_installs_only_the_locked_wheels() -> None:
    args, stages = parse_dockerfile(DOCKERFILE.read_text())
    # The base image is pinned by digest; the tag says which one it is.
    assert re.fullmatch(
        r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", args["PYTHON_IMAGE"]
    ), args["PYTHON_IMAGE"]
    build, final = stages
    assert (build.base, build.name) == (args["PYTHON_IMAGE"], "build")
    assert (final.base, final.name) == (args["PYTHON_IMAGE"], None)

    # The build stage takes the dependencies from the lock, hashes checked, as wheels only.
    download, project = build.all("RUN")
    assert download == (
        "python -m pip download --require-hashes --only-binary=:all: --no-deps "
        "--dest /wheels -r requirements/operator.lock"
    )
    assert project == "python -m pip wheel --no-deps --wheel-dir /wheels ."

    # The final stage copies nothing in and installs the wheels only: no index, no compiler; the
    # lock again with its hashes, then the project without resolving anything.
    assert not final.all("COPY")
    assert not final.all("ADD")
    [install] = final.all("RUN")
    assert "--mount=type=bind,from=build,source=/wheels,target=/wheels" in install
    steps = [step.strip() for step in re.sub(r"--mount=\S+\s+", "", install).split("&&")]
    assert steps == [
        "python -m pip install --no-index --find-links=/wheels --require-hashes --no-deps "
        "-r /requirements/operator.lock",
        "python -m pip install --no-index --no-deps /wheels/melange_operator-*.whl",
        "python -m pip check",
    ]

    # The chart runs the image as it is meant to run: same user, same command.
    pod = one(render(), "Deployment")["spec"]["template"]["spec"]
    assert final.all("USER") == [
        f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    ]
    [entrypoint] = final.all("ENTRYPOINT")
    assert json.loads(entrypoint) == pod["containers"][0]["command"] == ["melange", "run"]

    # The build context admits exactly what the build stage copies.
    admitted = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    sources = {src.rstrip("/") for copy in build.all("COPY") for src in copy.split()[:-1]}
    assert sources == admitted


def test_image_labels_follow_the_oci_annotations() -> None:
    _, (_, final) = parse_dockerfile(DOCKERFILE.read_text())
    found = labels(final)
    assert set(found) == {
        f"{OCI}{key}"
        for key in ("title", "description", "licenses", "version", "revision", "source")
    }
    assert found[f"{OCI}title"] == PYPROJECT["name"]
    assert found[f"{OCI}licenses"] == PYPROJECT["license"]
    assert found[f"{OCI}description"]
    # version, revision and source are build arguments; the version defaults to the project's.
    defaults = stage_args(final)
    for key, arg in (("version", "VERSION"), ("revision", "REVISION"), ("source", "SOURCE")):
        assert found[f"{OCI}{key}"] == f"${{{arg}}}"
        assert arg in defaults
    assert defaults["VERSION"] == PYPROJECT["version"]


def test_the_lock_pins_every_runtime_dependency_within_its_range() -> None:
    pins = parse_lock(LOCK.read_text())
    assert pins, "empty lock"
    assert all(pin.hashes for pin in pins.values()), "a pin without a hash"
    for line in PYPROJECT["dependencies"]:
        requirement = Requirement(line)
        pin = pins.get(canonicalize_name(requirement.name))
        assert pin is not None, f"{requirement.name} is not in {LOCK.name}"
        assert requirement.specifier.contains(Version(pin.version)), (line, pin.version)
    # Runtime only: neither the development tools nor the previous release's modeller (PuLP,
    # which ships CBC binaries for every OS) are in the image.
    development = {
        canonicalize_name(Requirement(r).name) for r in PYPROJECT["optional-dependencies"]["dev"]
    }
    assert "pulp" in development
    assert not development & set(pins)
    assert canonicalize_name(PYPROJECT["name"]) not in pins


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
    env.pop("PIP_FIND_LINKS", None)  # the install step must find everything in /wheels alone
    [site] = (venv / "lib").glob("python3*/site-packages")
    fresh = set(site.rglob("*"))  # what the venv comes with (pip's own Windows launchers)

    def run(command: str, cwd: Path) -> None:
        command = command.replace("/wheels", str(wheels)).replace(
            "/requirements/", f"{source / 'requirements'}/"
        )
        result = subprocess.run(
            ["sh", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"

    for command in build.all("RUN"):
        run(command, source)
    built = sorted(p.name for p in wheels.iterdir())
    assert all(name.endswith(".whl") for name in built)
    assert "melange_operator-0.1.0-py3-none-any.whl" in built
    # One wheel per pin, and the project's.
    assert len(built) == len(parse_lock(LOCK.read_text())) + 1

    [install] = final.all("RUN")
    run(re.sub(r"--mount=\S+\s+", "", install), tmp_path)

    melange = venv / "bin" / "melange"
    version = subprocess.run(
        [str(melange), "--version"], capture_output=True, text=True, check=True, env=env
    )
    assert version.stdout.strip() == f"melange, version {PYPROJECT['version']}"
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
    # Exactly the locked versions are installed, and the solver's binaries are Linux ones only.
    frozen = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    installed: dict[str, str] = {
        canonicalize_name(p["name"]): p["version"] for p in json.loads(frozen.stdout)
    }
    pins = parse_lock(LOCK.read_text())
    assert {name: installed.get(name) for name in pins} == {n: p.version for n, p in pins.items()}
    assert "pulp" not in installed
    foreign = [
        p.relative_to(site)
        for p in set(site.rglob("*")) - fresh
        if p.suffix.lower() in {".dll", ".dylib", ".exe", ".pyd"}
    ]
    assert foreign == []
