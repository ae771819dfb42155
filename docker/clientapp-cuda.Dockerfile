# syntax=docker/dockerfile:1
# prism-flwr ClientApp image for GPU nodes: a Flower SuperExec on NVIDIA's CUDA base, with a
# CUDA build of torch. Runs the ClientApps of a SuperNode started with `--isolation process`;
# run-config `device = "auto"` (the default) then trains on the GPU.
#
# The container needs the host's NVIDIA driver through the NVIDIA Container Toolkit:
#   docker run --gpus all ...      (Compose: deploy.resources.reservations.devices, see gen-compose.py)
# The torch wheels bring their own CUDA runtime libraries; the base image supplies the
# NVIDIA_VISIBLE_DEVICES / NVIDIA_DRIVER_CAPABILITIES settings the toolkit reads. The host driver
# must support the CUDA version of the torch build (nvidia-smi shows the highest it supports).
#   - x86_64: the default PyPI torch wheels are CUDA builds; pick a specific one with
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 (or another cuXYZ).
#   - arm64 servers (Grace Hopper): use a cuXYZ index as above (PyPI's arm64 wheels are CPU-only).
#   - Jetson: use --build-arg CUDA_BASE=<an NVIDIA L4T/JetPack PyTorch image> with its own torch
#     and --build-arg TORCH_INDEX_URL= to skip the torch install below.
#
# Build from the repository root (no Docker engine on the dev machines: linted with hadolint only):
#   docker build -f docker/clientapp-cuda.Dockerfile -t prism-flwr/clientapp:cuda .
ARG CUDA_BASE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${CUDA_BASE}

ARG FLWR_VERSION=1.42.0
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://pypi.org/simple
# pip settings for the build only (a local mirror, a proxy's CA); unset unless given.
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CONSTRAINT
ARG PIP_CERT

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LANG=C.UTF-8 \
    HOME=/app \
    PATH=/python/venv/bin:$PATH \
    FLWR_DISABLE_UPDATE_CHECK=1

# Python from the distribution (Ubuntu 24.04: 3.12), in a venv owned by the same non-root user
# (uid 49999) as Flower's own images, so volumes and secrets behave the same way.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 49999 app \
    && useradd --no-create-home --home-dir /app --uid 49999 --gid 49999 --comment "" app \
    && mkdir -p /app /python \
    && chown app:app /app /python

USER 49999:49999
WORKDIR /app
# --system-site-packages: a base image that brings its own torch (Jetson) keeps it visible.
RUN python3 -m venv --system-site-packages /python/venv \
    && if [ -n "${TORCH_INDEX_URL}" ]; then \
        python -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
            "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"; \
    fi \
    && python -m pip install --no-cache-dir "flwr==${FLWR_VERSION}"

COPY --chown=app:app pyproject.toml README.md client_app.py server_app.py ./
COPY --chown=app:app prism_flwr/ prism_flwr/
COPY --chown=app:app strategies/ strategies/
RUN sed -i 's/"flwr\[simulation\]/"flwr/' pyproject.toml \
    && python -m pip install --no-cache-dir . \
    && mkdir -p /app/.cache/prism-flwr/data /app/prism-flwr/outputs /app/.local/state/prism-flwr

ENTRYPOINT ["flower-superexec"]
