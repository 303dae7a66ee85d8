#!/usr/bin/env bash
# The test command: all set-up the suite needs, then pytest. Each step is skipped when already done.
#   1. .venv with fastenc[dev] (scripts/bootstrap.sh; CPU torch pinned on machines without a GPU)
#   2. system packages for the C++ client, Triton server and browser (study) tests (scripts/ci_system_deps.sh; without
#      root it prints which tests will skip and the command that fixes it)
#   3. .venv-triton, the Triton Inference Server environment (scripts/triton_env.sh)
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_cli.py -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
bash scripts/ci_system_deps.sh
if ! bash scripts/triton_env.sh; then
  echo "test.sh: scripts/triton_env.sh failed (offline?): the Triton Inference Server tests will skip;" \
       "rerun \`bash scripts/triton_env.sh\` to see why" >&2
fi
exec "${FASTENC_VENV:-.venv}/bin/python" -m pytest -q "$@"
