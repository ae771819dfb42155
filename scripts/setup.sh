#!/usr/bin/env bash
# Idempotent set-up shared by run.sh and test.sh:
#  1. real Fashion-MNIST: Debian's dataset-fashion-mnist package where apt-get works as root,
#     otherwise torchvision's download into the default data directory (needs the internet);
#  2. a virtual environment .venv with the project and its test extras (pip -e).
set -euo pipefail
cd "$(dirname "$0")/.."
FMNIST=/usr/share/datasets/fashion-mnist
# Debian packages the tests use, installed where apt-get works as root: the dataset; nginx-light,
# the Fleet-API-only reverse proxy of the deployment (tested on loopback); shellcheck, which checks
# scripts/check-images.sh. Without root the tests that need them are skipped (pytest -rs says which).
missing=()
[ -d "$FMNIST" ] || missing+=(dataset-fashion-mnist)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
if [ "${#missing[@]}" -gt 0 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian's ${missing[*]}"
    (apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null) \
        || echo "[setup] apt-get could not install ${missing[*]}: the tests that need them are skipped"
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
