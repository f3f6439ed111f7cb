#!/usr/bin/env bash
# Installs every system dependency of ultramem on Debian 12, non-interactively and idempotently.
# Usage: bash scripts/setup.sh          (needs root or passwordless sudo)
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config
  libtorch-dev libopenblas-dev libgloo-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  sentencepiece
  libcli11-dev nlohmann-json3-dev
  zlib1g-dev
  python3-torch python3-numpy python3-pip python3-sentencepiece
  gnuplot-nox
  libcpp-httplib-dev liburing-dev
  clang-14 libclang-rt-14-dev libomp-14-dev
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "setup.sh: run as root (or install sudo) to install: ${PACKAGES[*]}" >&2; exit 1
  fi
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "setup.sh: all system packages present"
else
  echo "setup.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Node.js and the npm packages of the `ultramem serve` tests (tests/serve: the openai SDK, pinned by
# tests/serve/package-lock.json). Installs nodejs and npm with apt-get if either is missing, as
# scripts/fetch_corpus.sh does; runs `npm ci` only when tests/serve/node_modules/openai is missing.
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
  echo "setup.sh: node $(node --version) present"
else
  echo "setup.sh: node or npm not found; installing nodejs and npm with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
if [ -d "$repo_root/tests/serve/node_modules/openai" ]; then
  echo "setup.sh: npm packages of tests/serve present"
else
  echo "setup.sh: installing the npm packages of tests/serve (npm ci)"
  npm ci --no-audit --no-fund --prefix "$repo_root/tests/serve"
fi
