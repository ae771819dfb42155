# syntax=docker/dockerfile:1
# prism-flwr ServerApp image: a Flower SuperExec with this app's dependencies installed. It runs
# the ServerApps of a SuperLink started with `--isolation process` (the SuperLink itself is the
# stock flwr/superlink image and needs no app code). The ServerApp evaluates on the dataset's test
# split and writes checkpoints, history.json, samples and model.prism to its output-dir: mount
# volumes at /app/.cache/prism-flwr/data and /app/prism-flwr/outputs.
#
# Base: flwr/superexec (Ubuntu 24.04, user `app` uid 49999, HOME=WORKDIR=/app; amd64 and arm64).
# Build from the repository root (no Docker engine on the dev machines: linted with hadolint only):
#   docker build -f docker/serverapp.Dockerfile -t prism-flwr/serverapp:cpu .
# Run next to `flower-superlink --isolation process --host 0.0.0.0 ...`:
#   docker run -d -v prism-data:/app/.cache/prism-flwr/data -v prism-outputs:/app/prism-flwr/outputs \
#       prism-flwr/serverapp:cpu --insecure --runtime-api-address SUPERLINK_HOST:8000
# For server-side evaluation on a GPU, build with --build-arg TORCH_INDEX_URL=https://pypi.org/simple
# (CUDA wheels on x86_64) and run with --gpus all; run-config device=auto then picks CUDA.
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

RUN python -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# flwr comes with the base image; `flwr[simulation]` would add Ray, which deployment never uses.
COPY --chown=app:app pyproject.toml README.md client_app.py server_app.py ./
COPY --chown=app:app prism_flwr/ prism_flwr/
COPY --chown=app:app strategies/ strategies/
RUN sed -i 's/"flwr\[simulation\]/"flwr/' pyproject.toml \
    && python -m pip install --no-cache-dir . \
    && mkdir -p /app/.cache/prism-flwr/data /app/prism-flwr/outputs

ENV FLWR_DISABLE_UPDATE_CHECK=1
ENTRYPOINT ["flower-superexec"]
