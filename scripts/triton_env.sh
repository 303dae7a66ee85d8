#!/usr/bin/env bash
# Create (or reuse) the separate virtual environment that runs Triton Inference Server for the tests
# and for local trials of `fastenc triton-repo` output.
#
#   nvidia-pytriton   bundles a real `tritonserver` (python backend only); pins numpy<2, hence its own venv
#   tritonclient      HTTP client + model_config_pb2 (config.pbtxt validation)
#   onnxruntime       what the python-backend encoder model (`--encoder-backend python`) runs
#   fastenc           what the python-backend tokenizer model imports (editable; CPU torch via constraints)
#
# Idempotent: a stamp newer than this script and pyproject.toml makes a rerun exit at once.
# The venv path is $FASTENC_TRITON_VENV (default .venv-triton); the interpreter $TRITON_PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FASTENC_TRITON_VENV:-.venv-triton}"
stamp="$venv/.fastenc-triton-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt "$0" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  "${TRITON_PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
constraint=()
if ! command -v nvidia-smi >/dev/null 2>&1; then
  constraint=(-c constraints-cpu.txt)
fi
"$py" -m pip install -q "${constraint[@]}" \
  "nvidia-pytriton>=0.5" "tritonclient[http]>=2.40" "numpy<2" "onnxruntime>=1.18" "protobuf"
"$py" -m pip install -q "${constraint[@]}" "numpy<2" -e .
"$py" - <<'PY'
import importlib.util, pathlib
import pytriton, tritonclient.grpc.model_config_pb2, onnxruntime, fastenc.tokenizer  # noqa: F401
root = pathlib.Path(pytriton.__file__).parent
assert (root / "tritonserver" / "bin" / "tritonserver").is_file(), f"no tritonserver under {root}"
PY
touch "$stamp"
