#!/usr/bin/env bash
# Install the Debian packages the C++ client and Triton server tests need (idempotent).
#   libsentencepiece-dev  sentencepiece C++ headers + library for csrc/ (fastenc-embed)
#   libpython3.11         the Triton python-backend stub embeds it (scripts/triton_env.sh)
#   cmake, g++, make      build csrc/ against the libtorch inside the torch wheel
# Does nothing (and needs no root) when everything is already installed.
set -euo pipefail
packages=(libsentencepiece-dev libpython3.11 cmake g++ make)
missing=()
for pkg in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ci_system_deps.sh: apt-get not found; install ${missing[*]} with your package manager" >&2
  exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  sudo=(sudo)
fi
echo "ci_system_deps.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
