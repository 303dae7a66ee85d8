#!/usr/bin/env bash
# Serve a Triton model repository with the `tritonserver` bundled in the nvidia-pytriton wheel,
# on loopback only. That server has the python backend and no other: serve repositories written
# with `fastenc triton-repo --encoder-backend python` or `fastenc-cpu` (a full Triton install serves the others).
#
#   export/triton/serve_pytriton.sh REPO [HTTP_PORT [GRPC_PORT [METRICS_PORT]]] [-- EXTRA TRITONSERVER FLAGS]
#
# Environment: FASTENC_TRITON_VENV   the venv of scripts/triton_env.sh (default: .venv-triton)
#              FASTENC_TRITON_WORKDIR where the server is laid out (default: ~/.cache/fastenc/tritonserver)
# The server replaces this script's process (exec), so signalling the script's pid stops the server.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 REPO [HTTP_PORT [GRPC_PORT [METRICS_PORT]]] [-- TRITONSERVER FLAGS]" >&2
  exit 2
fi
here="$(cd "$(dirname "$0")/../.." && pwd)"
repo="$(realpath "$1")"; shift
ports=(8000 8001 8002)
for i in 0 1 2; do
  if [ $# -gt 0 ] && [ "$1" != "--" ]; then ports[$i]="$1"; shift; fi
done
[ "${1:-}" = "--" ] && shift
venv="$(realpath "${FASTENC_TRITON_VENV:-$here/.venv-triton}")"
if [ ! -x "$venv/bin/python" ]; then
  echo "serve_pytriton.sh: no venv at $venv; run scripts/triton_env.sh first" >&2
  exit 1
fi
read -r site pyver < <("$venv/bin/python" -c 'import sys, sysconfig; print(sysconfig.get_paths()["purelib"], "%d.%d" % sys.version_info[:2])')
dist="$site/pytriton/tritonserver"
if [ ! -x "$dist/bin/tritonserver" ]; then
  echo "serve_pytriton.sh: $venv has no nvidia-pytriton tritonserver; run scripts/triton_env.sh" >&2
  exit 1
fi
work="${FASTENC_TRITON_WORKDIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fastenc/tritonserver}"
server="$work/tritonserver"
stub="$dist/python_backend_stubs/$pyver/triton_python_backend_stub"
# Lay out bin/ + backends/python/ with the stub for this Python (what pytriton does before it starts
# the server); redone when the wheel's files are newer than the copy.
if [ ! -x "$server/backends/python/triton_python_backend_stub" ] || [ "$dist/bin/tritonserver" -nt "$server/bin/tritonserver" ]; then
  rm -rf "$server"
  mkdir -p "$work"
  tmp="$(mktemp -d "$work/.prepare.XXXXXX")"
  cp -r "$dist/bin" "$dist/backends" "$dist/caches" "$tmp/"
  cp "$stub" "$tmp/backends/python/triton_python_backend_stub"
  mv "$tmp" "$server"
fi
export LD_LIBRARY_PATH="$site/nvidia_pytriton.libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$venv/bin:$PATH"
exec "$server/bin/tritonserver" \
  --model-repository "$repo" \
  --backend-directory "$server/backends" \
  --cache-directory "$server/caches" \
  --http-address 127.0.0.1 --http-port "${ports[0]}" \
  --grpc-address 127.0.0.1 --grpc-port "${ports[1]}" \
  --metrics-address 127.0.0.1 --metrics-port "${ports[2]}" \
  --exit-timeout-secs 10 \
  "$@"
