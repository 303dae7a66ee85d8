#!/usr/bin/env bash
# Create (or reuse) .venv and install fastenc with the extras named in $1 (default: dev).
# On a machine without an NVIDIA GPU torch is pinned to the CPU wheel through
# constraints-cpu.txt; where a GPU is present, or torch is already installed in the
# environment, the existing torch is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
venv="${FASTENC_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.fastenc-installed-$extras"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
"$py" -m pip install -q --upgrade pip
constraint=()
if ! command -v nvidia-smi >/dev/null 2>&1; then
  constraint=(-c constraints-cpu.txt)
fi
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  "$py" -m pip install -q "${constraint[@]}" "torch==2.13.0" 2>/dev/null \
    || "$py" -m pip install -q "${constraint[@]}" torch
fi
"$py" -m pip install -q "${constraint[@]}" -e ".[$extras]"
touch "$stamp"
