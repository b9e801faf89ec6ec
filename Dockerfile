# syntax=docker/dockerfile:1
# One image for the three fedkube roles, chosen by sub-command:
#   docker run IMAGE operator --all-namespaces
#   docker run IMAGE coordinator --job /etc/fedkube/job.yaml
#   docker run IMAGE agent --coordinator HOST:50051
# CPU torch by default; for CUDA pick another wheel index, e.g.
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/fedkube \
    PATH=/opt/fedkube/bin:$PATH

# The venv and torch in one layer of their own, before any of our files: torch is most
# of the image and changes far less often than our code, so rebuilds reuse this layer.
RUN python -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY runtime/ runtime/
COPY operator/ operator/
# The torch pin above already satisfies pyproject's range, so pip keeps that wheel and
# takes the remaining dependencies from PyPI. Not editable: the final stage gets no /src.
# Byte-code is compiled here because the chart runs with a read-only root filesystem.
RUN pip install --no-cache-dir . \
    && python -m compileall -q "$VIRTUAL_ENV"

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="fedkube" \
      org.opencontainers.image.description="Federated learning the Kubernetes way: operator, coordinator and edge agent in one image" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/fedkube/fedkube"

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 fedkube \
    && useradd --system --uid 10001 --gid fedkube --home-dir /home/fedkube --create-home \
       --shell /usr/sbin/nologin fedkube

COPY --from=builder /opt/fedkube /opt/fedkube

ENV VIRTUAL_ENV=/opt/fedkube \
    PATH=/opt/fedkube/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/fedkube \
    MPLCONFIGDIR=/tmp/matplotlib

USER 10001:10001
WORKDIR /home/fedkube

# gRPC (coordinator), Prometheus metrics, kopf liveness (operator).
EXPOSE 50051 9090 8080

# Proves the interpreter, the package and its imports are intact; it does not probe a
# role's liveness (Kubernetes' probes in the Helm chart do that per role).
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["fedkube", "version"]

ENTRYPOINT ["fedkube"]
CMD ["--help"]
