# The gateway image: multi-stage, slim, non-root.
#
# The base comes in as a build argument so the image builds where no registry can be
# reached (scripts/container-smoke imports a debootstrap'd Debian bookworm as the base).
# Any Debian-like base with python3 (>= 3.11) and its venv module will do; the default
# is the official slim Python image, pinned to an exact patch release (add @sha256:...
# where a registry can be reached; none could be from where this file was written).
#
#   podman build --format docker -t inference-gateway .
#   podman build --format docker --build-arg BASE_IMAGE=localhost/bookworm-python:latest \
#       --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/src/wheelhouse -t gw .
ARG BASE_IMAGE=docker.io/library/python:3.11.14-slim-bookworm

# ---- build: a virtual environment with the gateway and its wheels ---------------------
FROM ${BASE_IMAGE} AS build
# Lets scripts/container-smoke remove this stage's image after a build.
LABEL io.inference-gateway.stage=build
# Offline builds pass PIP_NO_INDEX=1 and PIP_FIND_LINKS=<a wheelhouse in the context>;
# pip reads both from the environment.
ARG PIP_NO_INDEX=
ARG PIP_FIND_LINKS=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY . /src
RUN python3 -m venv /opt/gateway \
    && /opt/gateway/bin/pip install --no-cache-dir /src \
    && /opt/gateway/bin/pip uninstall --yes pip \
    && find /opt/gateway -name __pycache__ -prune -exec rm -rf {} +

# ---- runtime: the base, the venv, the model repository, nothing else -------------------
FROM ${BASE_IMAGE} AS runtime
ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    GATEWAY_MODEL_REPOSITORY=/opt/gateway/model_repository
COPY --from=build /opt/gateway /opt/gateway
COPY model_repository /opt/gateway/model_repository
# A fixed numeric uid/gid (no passwd entry needed) so Kubernetes' runAsNonRoot can
# verify it; nothing in the image is writable by it.
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
# Liveness only (/healthz calls no dependency); readiness belongs to the orchestrator.
HEALTHCHECK --interval=10s --timeout=2s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=1)"]
ENTRYPOINT ["gateway", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8080"]
