# syntax=docker/dockerfile:1
# The operator's image: `melange run` as a non-root user, on a read-only root file system.
#
#   docker build -t melange-operator:0.1.0 .
#
# Two stages: the first builds the wheels of the project and of every dependency
# (scripts/build-wheels.sh, which the tests run too); the second installs only those wheels,
# without a network or a compiler, and keeps no build files.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY scripts/build-wheels.sh scripts/
RUN sh scripts/build-wheels.sh /wheels

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="melange-operator" \
      org.opencontainers.image.description="Keeps LLM serving on the cheapest mix of GPU node pools that meets the latency SLO" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The wheels are mounted for this step only, so no layer keeps them.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-index --find-links=/wheels melange-operator
# A numeric UID (no passwd entry needed), so that runAsNonRoot can check it; the chart uses the same.
USER 65532:65532
WORKDIR /tmp
# Liveness (melange run --liveness) and metrics (--metrics-port, default 8000).
EXPOSE 8080 8000
ENTRYPOINT ["melange", "run"]
