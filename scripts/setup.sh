#!/usr/bin/env bash
# Idempotent set-up shared by run.sh and test.sh:
#  1. real Fashion-MNIST: Debian's dataset-fashion-mnist package where apt-get works as root,
#     otherwise torchvision's download into the default data directory (needs the internet);
#  2. a virtual environment .venv with the project and its test extras (pip -e).
set -euo pipefail
cd "$(dirname "$0")/.."
FMNIST=/usr/share/datasets/fashion-mnist
# nginx-light: the Fleet-API-only reverse proxy of the deployment (tested on loopback; without it
# those checks are skipped).
if { [ ! -d "$FMNIST" ] || ! command -v nginx >/dev/null 2>&1; } && command -v apt-get >/dev/null 2>&1 \
        && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian's dataset-fashion-mnist and nginx-light"
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist nginx-light >/dev/null) \
        || echo "[setup] apt-get could not install them; Fashion-MNIST will come from torchvision's download"
fi
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    "${PYTHON:-python3}" -m venv .venv
fi
if ! .venv/bin/python -c "import prism_flwr, flwr, torch, pytest, hypothesis" >/dev/null 2>&1 \
        || [ pyproject.toml -nt .venv/.prism-installed ]; then
    echo "[setup] installing the project into .venv (first time: a few minutes)"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[test]"
    touch .venv/.prism-installed
fi
if [ ! -d "$FMNIST" ]; then
    .venv/bin/prism-flwr data fmnist --download auto
fi
