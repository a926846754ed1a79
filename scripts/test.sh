#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what it needs, then lint, types and tests.
# Extra arguments go to one pytest run instead (e.g. `bash scripts/test.sh -k solver`).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'

# A real Prometheus server for the rate-source end-to-end tests: Debian's package (the tests only
# use its binary and start their own servers on loopback).
if ! command -v prometheus >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    prometheus >/dev/null
fi

# Real kube-apiserver, etcd and helm for the end-to-end tests, built from Go modules and cached
# outside the tree (the first build takes a while; later runs reuse the binaries).
bash tests/controlplane/build.sh

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports
if [ "$#" -gt 0 ]; then
  exec .venv/bin/pytest "$@"
fi
# Everything but the chaos scenarios, then the chaos scenarios (faults injected into the real
# parts; minutes of outages and load) as a step of their own. Two workers (pytest-xdist), each
# with its own control plane: the end-to-end tests mostly wait on intervals, so two of them share
# the 2 cores well. A module's tests stay on one worker in the first step (module fixtures); the
# chaos scenarios are spread one by one. The slowest tests are listed at the end of each step, to
# keep the suite's time in view.
.venv/bin/pytest -m "not chaos" -n 2 --dist loadfile --durations=20
.venv/bin/pytest -m chaos -n 2 --dist load --durations=10
