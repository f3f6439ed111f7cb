#!/usr/bin/env bash
# The project's test command: install, build, run the whole CTest suite (C++ and Python tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
ctest --preset release "$@"
