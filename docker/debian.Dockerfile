# syntax=docker/dockerfile:1
# Stand-ins for the Docker Hub images the other Dockerfiles start from, built from Debian's
# packages only (for machines that reach Debian's mirror and PyPI but not Docker Hub):
#   target python       ~ python:3.11-slim         (edge.Dockerfile: PYTHON_IMAGE)
#   target superlink    ~ flwr/superlink:1.42.0
#   target supernode    ~ flwr/supernode:1.42.0
#   target superexec    ~ flwr/superexec:1.42.0    (serverapp/clientapp.Dockerfile: BASE_IMAGE)
#   target fleet-proxy  ~ nginx:1.27-bookworm      (Debian's nginx-light 1.22)
# Like Flower's images: Python in a venv at /python/venv owned by the non-root user `app`
# (uid 49999), HOME=WORKDIR=/app. DEBIAN_IMAGE is any Debian 12 root file system, e.g. one made
# with `debootstrap --variant=minbase bookworm DIR && tar -C DIR -c . | podman import - NAME`
# (scripts/check-images.sh does this), or debian:bookworm-slim where Docker Hub is reachable:
#   podman build -f docker/debian.Dockerfile --target superexec \
#       --build-arg DEBIAN_IMAGE=localhost/prism-flwr/debian:bookworm -t prism-flwr/superexec:1.42.0 .
ARG DEBIAN_IMAGE=debian:bookworm-slim

FROM ${DEBIAN_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Debian 12's python3 is 3.11, the version the project is tested with.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python-is-python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM python AS flower
ARG FLWR_VERSION=1.42.0
# pip settings for the build only (e.g. a local mirror); unset unless given with --build-arg.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CONSTRAINT
ARG PIP_CERT
RUN groupadd --gid 49999 app \
    && useradd --no-create-home --home-dir /app --uid 49999 --gid 49999 --comment "" app \
    && mkdir -p /app /python \
    && chown app:app /app /python
USER 49999:49999
WORKDIR /app
ENV HOME=/app \
    PATH=/python/venv/bin:$PATH \
    FLWR_DISABLE_UPDATE_CHECK=1
RUN python -m venv /python/venv \
    && python -m pip install --no-cache-dir "flwr==${FLWR_VERSION}"

FROM flower AS superlink
ENTRYPOINT ["flower-superlink"]

FROM flower AS supernode
ENTRYPOINT ["flower-supernode"]

FROM flower AS superexec
ENTRYPOINT ["flower-superexec"]

FROM ${DEBIAN_IMAGE} AS fleet-proxy
# The configuration is mounted at /etc/nginx/nginx.conf (docker/fleet-proxy/); logs go to stderr.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx-light \
    && rm -rf /var/lib/apt/lists/* \
    && ln -sf /dev/stderr /var/log/nginx/error.log
STOPSIGNAL SIGQUIT
ENTRYPOINT ["nginx", "-g", "daemon off;"]
