# syntax=docker/dockerfile:1
# prism-flwr edge image: one container per edge device (Raspberry Pi 4/5, Jetson CPU, x86 mini-PC)
# running a SuperNode that serves its ClientApps from one warm worker process (`prism-flwr
# supernode --warm`, no SuperExec process), so a device needs a single container and no open port but the
# outbound connection to the SuperLink's Fleet API (fleet-proxy, port 9092). docs/edge.md.
#
# Where torch comes from is a build argument:
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu   (default) the CPU-only build
#   TORCH_INDEX_URL=https://pypi.org/simple                PyPI: on x86_64 the CUDA build (runs on
#                                                           the CPU too, several GB larger); on
#                                                           aarch64 CPU-only up to torch 2.9.1
#   TORCH_VERSION=2.13.0+cpu with PIP_FIND_LINKS=DIR        a CPU wheel from a local wheelhouse
# No torchvision: the ClientApp does not import it (docker/client-requirements.txt).
# Base: python:3.11-slim, multi-arch (linux/amd64, linux/arm64/v8): builds natively on an ARM
# board or cross-builds with buildx. torch needs a 64-bit OS (no armv7 wheels). For an arm64
# image built on x86_64 without emulating pip, see edge-site.Dockerfile.
#   docker buildx build --platform linux/arm64 -f docker/edge.Dockerfile -t REGISTRY/prism-flwr/edge --push .
# On the device (TLS + SuperNode authentication; the state volume keeps the node's privacy
# ledger and client state when the container is recreated):
#   docker run -d --restart unless-stopped --name prism-supernode --cpus 1 --memory 512m --memory-swap 512m \
#       -v prism-data:/app/.cache/prism-flwr/data -v prism-state:/app/.local/state/prism-flwr \
#       -v "$PWD/ca.crt:/app/certificates/ca.crt:ro" -v "$PWD/node.key:/app/keys/node.key:ro" \
#       REGISTRY/prism-flwr/edge --superlink SUPERLINK_HOST:9092 --root-certificates certificates/ca.crt \
#       --auth-supernode-private-key keys/node.key --node-config "partition-id=0 num-partitions=4"
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ARG FLWR_VERSION=1.42.0
ARG TORCH_VERSION=2.14.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# pip settings for the build only (a local mirror, a proxy's CA); unset unless given.
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CONSTRAINT
ARG PIP_CERT

# MALLOC_ARENA_MAX=2: glibc gives each thread that allocates its own heap (arena); the SuperNode's
# threads (HTTP server, executor, heartbeats) otherwise keep tens of MiB resident in them.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MALLOC_ARENA_MAX=2 \
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
COPY --chown=app:app docker/client-requirements.txt /python/client-requirements.txt
# torch's C++ headers, test binaries and tests (about 200 MB) serve building extensions and
# testing torch, not running it: removed in the layer that installs them (torch/bin keeps
# torch_shm_manager, which `import torch` looks for).
RUN python -m venv /python/venv \
    && python -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && python -m pip install --no-cache-dir -r /python/client-requirements.txt "flwr==${FLWR_VERSION}" \
    && torch=$(python -c "import importlib.util as u; print(u.find_spec('torch').submodule_search_locations[0])") \
    && rm -rf "$torch/include" "$torch/test" \
    && find "$torch/bin" -mindepth 1 -maxdepth 1 ! -name torch_shm_manager -exec rm -rf {} +

COPY --chown=app:app pyproject.toml README.md client_app.py server_app.py ./
COPY --chown=app:app prism_flwr/ prism_flwr/
COPY --chown=app:app strategies/ strategies/
# The data, state and output directories exist, owned by `app`: volumes mounted there start writable.
RUN python -m pip install --no-cache-dir --no-deps . \
    && mkdir -p /app/.cache/prism-flwr/data /app/prism-flwr/outputs /app/.local/state/prism-flwr

# Flower's SuperNode through prism-flwr's (prism_flwr/deployment/supernode.py): waits capped at
# 0.2 s; --warm: no SuperExec process, a thread of the SuperNode acquires the ClientApp tasks for
# one warm worker process that checks each bundle against the node config's trusted-apps /
# trusted-app-keys when it names them. Two processes instead of three fit a 512 MiB device.
ENTRYPOINT ["prism-flwr", "supernode", "--idle-poll", "0.2", "--warm", "--"]
