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
  torch_args=("${constraint[@]}" "torch==2.13.0")
  if [ ${#constraint[@]} -gt 0 ]; then
    # Plain PyPI's torch==2.13.0 is the CUDA build (with GBs of nvidia-* packages): where pip would resolve
    # to it, take the CPU build from PyTorch's CPU index instead (where a CPU wheel is at hand, nothing changes).
    # (scripts/torch_build.py reads pip's report: cuda, cpu, or unknown when the dry run failed, e.g. offline)
    build=$("$py" -m pip install --dry-run --quiet --report - "${torch_args[@]}" 2>/dev/null \
            | "$py" scripts/torch_build.py || true)
    if [ "$build" = cuda ]; then
      echo "bootstrap.sh: torch==2.13.0 would resolve to the CUDA build here; using the CPU build from" \
           "https://download.pytorch.org/whl/cpu" >&2
      torch_args+=(--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple)
    fi
  fi
  if ! "$py" -m pip install -q "${torch_args[@]}"; then
    echo "bootstrap.sh: installing torch==2.13.0 failed (above); trying the newest torch pip finds" >&2
    "$py" -m pip install -q "${constraint[@]}" torch
  fi
fi
"$py" -m pip install -q "${constraint[@]}" -e ".[$extras]"
touch "$stamp"
