# syntax=docker/dockerfile:1
# prism-flwr edge image: one container per edge device (Raspberry Pi 4/5, Jetson CPU, x86 mini-PC)
# running a SuperNode that starts its own SuperExec and ClientApps (Flower's default
# `--isolation subprocess`), so a device needs a single container and no open port but the
# outbound connection to the SuperLink.
#
# Base: python:3.11-slim, an official multi-arch image: its tag is a manifest list with variants
# for linux/amd64 and linux/arm64/v8 (and others), and Docker pulls the one matching the device,
# so the same Dockerfile builds natively on an ARM board or cross-builds with buildx. Python 3.11
# is the version the project is developed and tested with. torch needs a 64-bit OS (arm64): the
# CPU index has manylinux aarch64 wheels; 32-bit Raspberry Pi OS (armv7) has no torch wheels.
#   docker buildx build --platform linux/arm64 -f docker/edge.Dockerfile -t REGISTRY/prism-flwr/edge --push .
#   docker build -f docker/edge.Dockerfile -t prism-flwr/edge .        (natively, on the device)
# On the device (TLS + SuperNode authentication, see docs/deployment.md):
#   docker run -d --restart unless-stopped \
#       -v prism-data:/app/.cache/prism-flwr/data -v prism-outputs:/app/prism-flwr/outputs \
#       -v "$PWD/ca.crt:/app/certificates/ca.crt:ro" -v "$PWD/node.key:/app/keys/node.key:ro" \
#       prism-flwr/edge --superlink SUPERLINK_HOST:8000 --root-certificates certificates/ca.crt \
#       --auth-supernode-private-key keys/node.key --node-config "partition-id=0 num-partitions=4"
# The same image also serves as a SuperExec: --entrypoint flower-superexec.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ARG FLWR_VERSION=1.42.0
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# pip settings for the build only (a local mirror, a proxy's CA); unset unless given.
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CONSTRAINT
ARG PIP_CERT

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/app \
    PATH=/python/venv/bin:$PATH \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

RUN groupadd --gid 49999 app \
    && useradd --no-create-home --home-dir /app --uid 49999 --gid 49999 --comment "" app \
    && mkdir -p /app /python \
    && chown app:app /app /python

USER 49999:49999
WORKDIR /app
RUN python -m venv /python/venv \
    && python -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && python -m pip install --no-cache-dir "flwr==${FLWR_VERSION}"

COPY --chown=app:app pyproject.toml README.md client_app.py server_app.py ./
COPY --chown=app:app prism_flwr/ prism_flwr/
COPY --chown=app:app strategies/ strategies/
RUN sed -i 's/"flwr\[simulation\]/"flwr/' pyproject.toml \
    && python -m pip install --no-cache-dir . \
    && mkdir -p /app/.cache/prism-flwr/data /app/prism-flwr/outputs /app/.local/state/prism-flwr

ENTRYPOINT ["flower-supernode"]
