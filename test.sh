#!/usr/bin/env bash
# Set up (once) and run the test suite. Extra arguments go to pytest, e.g.  ./test.sh -k codec
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
