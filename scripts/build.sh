#!/usr/bin/env bash
# Installs system dependencies (if missing), configures and builds the release preset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake --preset release >/dev/null
cmake --build --preset release
