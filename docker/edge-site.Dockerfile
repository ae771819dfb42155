# syntax=docker/dockerfile:1
# The edge image (edge.Dockerfile) for another CPU architecture, from packages fetched on the build
# host: pip's own installer runs natively there, emulation (qemu-user-static) only copies files.
# scripts/check-images.sh --arm64 prepares the build context's .edge-site/ folder with
#   pip install --platform manylinux_2_28_aarch64 --only-binary=:all: --target .edge-site/site \
#       torch==2.9.1 (--no-deps: pip evaluates torch's nvidia markers for the host) + the rest of
#       docker/client-requirements.txt
# and builds with --platform linux/arm64. PYTHON_IMAGE: any Debian 12 image with python3 and
# python3-venv for that platform (python:3.11-slim, or one made with debootstrap --arch=arm64).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MALLOC_ARENA_MAX=2 \
    HOME=/app \
    PATH=/python/venv/bin:$PATH \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

# hadolint ignore=DL3059
RUN groupadd --gid 49999 app \
    && useradd --no-create-home --home-dir /app --uid 49999 --gid 49999 --comment "" app \
    && mkdir -p /app /python \
    && chown app:app /app /python
USER 49999:49999
WORKDIR /app
RUN python -m venv --without-pip /python/venv
# Debian 12 and python:3.11-slim: Python 3.11
COPY --chown=app:app .edge-site/site/ /python/venv/lib/python3.11/site-packages/
COPY --chown=app:app pyproject.toml README.md client_app.py server_app.py ./
COPY --chown=app:app prism_flwr/ prism_flwr/
COPY --chown=app:app strategies/ strategies/
# The fetched packages' scripts (written for the build host) are made again for the venv's
# interpreter; the project is installed as pip would (a copy of the package), without pip itself.
RUN sp=/python/venv/lib/python3.11/site-packages \
    && rm -rf "$sp/bin" \
    && python -c "import importlib.metadata as m; [open(f'/python/venv/bin/{p.name}', 'w').write(f'#!/python/venv/bin/python\nimport sys\nfrom {p.module} import {p.attr}\nsys.exit({p.attr}())\n') for p in m.entry_points(group='console_scripts') if p.name.startswith(('flwr', 'flower-'))]" \
    && chmod 0755 /python/venv/bin/flwr* /python/venv/bin/flower-* \
    && cp -a prism_flwr "$sp"/ \
    && mkdir -p /app/.cache/prism-flwr/data /app/prism-flwr/outputs /app/.local/state/prism-flwr

# As in edge.Dockerfile: `prism-flwr supernode --warm` (capped waits, no SuperExec process, one
# warm worker that checks each bundle against the node's trusted-apps); MALLOC_ARENA_MAX as there.
ENTRYPOINT ["python", "-m", "prism_flwr.cli", "supernode", "--idle-poll", "0.2", "--warm", "--"]
