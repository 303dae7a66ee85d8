#!/usr/bin/env bash
# The main job: set up .venv (scripts/bootstrap.sh) and run `fastenc demo` (a random-init base student when no
# checkpoint is given). It keeps what it makes in ./fastenc-demo (--out DIR to move it).
# Extra arguments go to `fastenc demo`, e.g. --checkpoint LifuWang/DistillT5 --tokenizer DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
exec "${FASTENC_VENV:-.venv}/bin/fastenc" demo "$@"
