# syntax=docker/dockerfile:1
# The operator's image: `melange run` as a non-root user, on a read-only root file system.
#
#   docker build -t melange-operator:0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" --build-arg SOURCE=https://github.com/OWNER/melange-operator .
#
# Two stages: the first downloads the runtime dependencies pinned in requirements/operator.lock,
# each checked against its hash (wheels only, nothing compiled), and builds the project's own wheel;
# the second installs only those wheels, without a network or a compiler, and keeps no build files.
# docs/image.md says what the image holds and how to refresh the lock and the base image.

# The base image, pinned by the digest of its multi-architecture index (the tag is for people).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements/operator.lock requirements/
RUN python -m pip download --require-hashes --only-binary=:all: --no-deps --dest /wheels -r requirements/operator.lock
COPY pyproject.toml README.md ./
COPY operator/ operator/
RUN python -m pip wheel --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
# OCI annotations: pass REVISION (the commit) and SOURCE (the repository's URL) when building.
ARG VERSION=0.1.0
ARG REVISION=""
ARG SOURCE=""
LABEL org.opencontainers.image.title="melange-operator" \
      org.opencontainers.image.description="Keeps LLM serving on the cheapest mix of GPU node pools that meets the latency SLO" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The wheels and the lock are mounted for this step only, so no layer keeps them. The dependencies
# are installed from the lock (every hash checked again), then the project without its dependencies;
# `pip check` fails the build if the lock does not satisfy the project's requirements.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    --mount=type=bind,from=build,source=/src/requirements,target=/requirements \
    python -m pip install --no-index --find-links=/wheels --require-hashes --no-deps -r /requirements/operator.lock \
    && python -m pip install --no-index --no-deps /wheels/melange_operator-*.whl \
    && python -m pip check
# A numeric UID (no passwd entry needed), so that runAsNonRoot can check it; the chart uses the same.
USER 65532:65532
WORKDIR /tmp
# Liveness (melange run --liveness) and metrics (--metrics-port, default 8000).
EXPOSE 8080 8000
ENTRYPOINT ["melange", "run"]
