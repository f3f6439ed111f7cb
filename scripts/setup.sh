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
  python3-torch python3-numpy
  gnuplot-nox
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
