#!/usr/bin/env bash
# Set up (once) and run PRISM on the Flower simulation engine: 4 SuperNodes, 1 CPU each.
# Extra arguments go to `flwr run`, e.g.  ./run.sh --run-config presets/cifar10.toml
# or ./run.sh --run-config 'dataset="cifar10" ngf=32'   (TOML values: strings in double quotes)
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
source .venv/bin/activate
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1
flwr run . --stream --federation-config "${PRISM_FEDERATION:-num-supernodes=4 client-resources-num-cpus=1}" "$@"
# `flwr run` exits 0 even when the ServerApp failed: report the run's real status.
prism-flwr last-run
