#!/usr/bin/env bash
# Set up .venv and run the main job: `fastenc demo` (random-init base student when no checkpoint).
# Extra arguments go to `fastenc demo`, e.g. --checkpoint LifuWang/DistillT5 --tokenizer DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
exec .venv/bin/fastenc demo "$@"
