#!/usr/bin/env bash
# Install the Debian packages the C++ client and Triton server tests need (idempotent; run by scripts/test.sh).
#   libsentencepiece-dev  sentencepiece C++ headers + library for csrc/ (fastenc-embed)
#   libpython3.11         the Triton python-backend stub embeds it (scripts/triton_env.sh)
#   cmake, g++, make      build csrc/ against the libtorch inside the torch wheel
#   chromium, chromium-driver  the headless browser tests/test_eval_study.py drives with Selenium
# Does nothing (and needs no root) when everything is already installed. Where it cannot install
# (no root and no password-less sudo, no apt-get, no network) it says which tests will skip and the
# one command that fixes it, and exits 0 so the rest of the suite still runs.
set -euo pipefail
packages=(libsentencepiece-dev libpython3.11 cmake g++ make chromium chromium-driver)
missing=()
for pkg in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

cannot() {  # $1: why
  local skips=()
  for pkg in "${missing[@]}"; do
    case "$pkg" in
      libpython3.11) skips+=("tests/test_triton_*.py (Triton Inference Server)") ;;
      chromium|chromium-driver) skips+=("tests/test_eval_study.py::test_study_in_a_browser (headless Chromium)") ;;
      *) skips+=("tests/test_csrc.py (C++ client)") ;;
    esac
  done
  {
    echo "ci_system_deps.sh: cannot install ${missing[*]} ($1)."
    echo "  these tests will skip: $(printf '%s\n' "${skips[@]}" | sort -u | paste -sd ',' | sed 's/,/, /g')"
    if command -v apt-get >/dev/null 2>&1; then
      echo "  fix: sudo apt-get install -y --no-install-recommends ${missing[*]}"
    else
      echo "  fix: install ${missing[*]} with your package manager"
    fi
  } >&2
  exit 0
}

if ! command -v apt-get >/dev/null 2>&1; then
  cannot "no apt-get on this machine"
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
  else
    cannot "not root, and no password-less sudo"
  fi
fi
echo "ci_system_deps.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
if ! "${sudo[@]}" apt-get update -qq || \
   ! "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
  cannot "apt-get failed; offline?"
fi
