#!/usr/bin/env bash
# The main job: install, build, and run the UltraMem layer demo (forward, backward, refresh and
# telemetry on a fitted random target). Pass --quick for a few-second run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
steps=200
if [ "${1:-}" = "--quick" ]; then steps=10; shift; fi
./build/release/ultramem layer-demo --steps "$steps" "$@"
