#!/bin/sh
# Build the wheel of melange-operator and the wheels of all its dependencies into WHEEL_DIR, so that
# they install later with `pip install --no-index --find-links=WHEEL_DIR melange-operator`, without
# a network or a compiler. The Dockerfile's build stage runs this; so does tests/chart/test_image.py.
#
# Usage: sh scripts/build-wheels.sh WHEEL_DIR      (python3 on PATH, or $PYTHON, runs pip)
set -eu

out="${1:?usage: sh scripts/build-wheels.sh WHEEL_DIR}"
src="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"

# --prefer-binary: dependencies come as released wheels; only the project itself is built here.
"$python" -m pip wheel --quiet --disable-pip-version-check --prefer-binary \
  --wheel-dir "$out" "$src"
ls "$out"
