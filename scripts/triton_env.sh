#!/usr/bin/env bash
# Create (or reuse) the separate virtual environment that runs Triton Inference Server for the tests
# and for local trials of `fastenc triton-repo` output.
#
#   nvidia-pytriton   bundles a real `tritonserver` (python backend only); pins numpy<2, hence its own venv
#   tritonclient      HTTP/gRPC client + model_config_pb2 (config.pbtxt validation)
#   perf-analyzer     Triton's load generator (`perf_analyzer`), driven by bench/serving.py
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
  "nvidia-pytriton>=0.5" "tritonclient[http,grpc]>=2.40" "numpy<2" "onnxruntime>=1.18" \
  "protobuf"
"$py" -m pip install -q "${constraint[@]}" "numpy<2" -e .

# perf_analyzer (PyPI perf-analyzer) is one C++ binary in a wheel tagged manylinux_2_38: it needs glibc 2.38
# and libstdc++ from GCC 13. Where the system's are older (Debian 12: glibc 2.36, GCC 12) pip will not
# install it, so it goes under $venv/opt with `--platform`, and, when it cannot start with the system's libc,
# runs under a private loader with libc6, libstdc++6 and libgcc-s1 unpacked (not installed: the system is
# left as it is) from Debian 13 packages. $venv/bin/perf_analyzer is a wrapper either way.
pa_version="2.60.0"
pa_dir="$venv/opt/perf-analyzer-$pa_version"
pa_bin="$pa_dir/perf_analyzer/bin/perf_analyzer"
if [ "$(uname -m)" = "x86_64" ]; then
  if [ ! -x "$pa_bin" ]; then
    rm -rf "$pa_dir.tmp"
    "$py" -m pip install -q --no-deps --only-binary=:all: --platform manylinux_2_38_x86_64 \
      --target "$pa_dir.tmp" "perf-analyzer==$pa_version"
    rm -rf "$pa_dir" && mv "$pa_dir.tmp" "$pa_dir"
  fi
  runtime="$venv/opt/glibc-runtime"
  lib="$runtime/usr/lib/x86_64-linux-gnu"
  if "$pa_bin" --version >/dev/null 2>&1; then
    printf '#!/bin/sh\nexec "%s" "$@"\n' "$(realpath "$pa_bin")" > "$venv/bin/perf_analyzer"
  else
    if [ ! -x "$lib/ld-linux-x86-64.so.2" ]; then
      apt_dir="$(mktemp -d)"
      mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/debs"
      # the Debian archive this system's apt already uses (its first non-security URI), suite trixie
      mirror="$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs:[[:space:]]*//p' | tr ' ' '\n' \
                | grep -v security | head -n1)"
      if [ -z "$mirror" ]; then
        mirror="$(grep -hs '^deb ' /etc/apt/sources.list | grep -v security | sed -E 's/^deb (\[[^]]*\] )?([^ ]+).*/\2/' | head -n1)"
      fi
      if [ -z "$mirror" ]; then
        echo "triton_env.sh: no Debian archive in this system's apt sources; perf_analyzer needs glibc >= 2.38" >&2
        exit 1
      fi
      echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" > "$apt_dir/sources.list"
      apt_opts=(-q -o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
                -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o Debug::NoLocking=1
                -o APT::Sandbox::User="$(id -un)")
      apt-get "${apt_opts[@]}" update >/dev/null
      (cd "$apt_dir/debs" && apt-get "${apt_opts[@]}" download libc6 libstdc++6 libgcc-s1 >/dev/null)
      rm -rf "$runtime.tmp" && mkdir -p "$runtime.tmp"
      for deb in "$apt_dir"/debs/*.deb; do dpkg-deb -x "$deb" "$runtime.tmp"; done
      rm -rf "$apt_dir" "$runtime" && mv "$runtime.tmp" "$runtime"
    fi
    printf '#!/bin/sh\nexec "%s" --library-path "%s:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu" "%s" "$@"\n' \
      "$(realpath "$lib")/ld-linux-x86-64.so.2" "$(realpath "$lib")" "$(realpath "$pa_bin")" > "$venv/bin/perf_analyzer"
  fi
  chmod +x "$venv/bin/perf_analyzer"
  "$venv/bin/perf_analyzer" --version >/dev/null 2>&1
else
  echo "triton_env.sh: perf_analyzer wheels here are x86_64 only; load benchmarks need it" >&2
fi
"$py" - <<'PY'
import importlib.util, pathlib
import pytriton, tritonclient.grpc.model_config_pb2, onnxruntime, fastenc.tokenizer  # noqa: F401
root = pathlib.Path(pytriton.__file__).parent
assert (root / "tritonserver" / "bin" / "tritonserver").is_file(), f"no tritonserver under {root}"
PY
touch "$stamp"
