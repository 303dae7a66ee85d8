#!/usr/bin/env bash
# Set up .venv (CPU torch pinned on machines without a GPU) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
exec .venv/bin/python -m pytest -q "$@"
