# syntax=docker/dockerfile:1
# prism-flwr ClientApp image, CPU: a Flower SuperExec with this app's dependencies installed. It
# runs the ClientApps of one SuperNode started with `--isolation process`.
#
# Base: flwr/superexec (Ubuntu 24.04, non-root user `app` uid 49999, HOME=WORKDIR=/app), published
# for linux/amd64 and linux/arm64, and the CPU torch index has wheels for both, so this file
# builds for x86 servers and 64-bit ARM edge boards alike (see edge.Dockerfile for a slimmer one).
#
# Build from the repository root (no Docker engine on the dev machines: linted with hadolint only):
#   docker build -f docker/clientapp.Dockerfile -t prism-flwr/clientapp:cpu .
#   docker buildx build --platform linux/amd64,linux/arm64 -f docker/clientapp.Dockerfile \
#       -t REGISTRY/prism-flwr/clientapp:cpu --push .
# Run next to `flower-supernode --isolation process --host 0.0.0.0 --port 9094 ...`:
#   docker run -d -v prism-data:/app/.cache/prism-flwr/data -v prism-outputs:/app/prism-flwr/outputs \
#       prism-flwr/clientapp:cpu --insecure --runtime-api-address SUPERNODE_HOST:9094
ARG FLWR_VERSION=1.42.0
# BASE_IMAGE: Flower's image by default; where Docker Hub is out of reach, the Debian-built
# stand-in from debian.Dockerfile (target superexec), as scripts/check-images.sh does.
ARG BASE_IMAGE=flwr/superexec:${FLWR_VERSION}
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# pip settings for the build only (a local mirror, a proxy's CA); unset unless given.
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CONSTRAINT
ARG PIP_CERT

WORKDIR /app

# CPU-only torch first (a few hundred MB instead of GBs of CUDA libraries); `pip install .` then
# finds torch already satisfied.
RUN python -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# The project: its dependencies and the `prism-flwr` CLI (data preparation). The base image has
# flwr already; `flwr[simulation]` would add Ray, which only the simulation engine needs.
COPY --chown=app:app pyproject.toml README.md client_app.py server_app.py ./
COPY --chown=app:app prism_flwr/ prism_flwr/
COPY --chown=app:app strategies/ strategies/
# Data and output directories exist in the image, owned by `app`, so that named volumes mounted
# there start writable (run-config data-dir ~/.cache/prism-flwr/data and output-dir ~/prism-flwr/outputs).
RUN sed -i 's/"flwr\[simulation\]/"flwr/' pyproject.toml \
    && python -m pip install --no-cache-dir . \
    && mkdir -p /app/.cache/prism-flwr/data /app/prism-flwr/outputs /app/.local/state/prism-flwr

ENV FLWR_DISABLE_UPDATE_CHECK=1
ENTRYPOINT ["flower-superexec"]
