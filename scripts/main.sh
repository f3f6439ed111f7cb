#!/usr/bin/env bash
# The main job: install, build, fetch and prepare the default corpus (State of the Union addresses),
# train the default UltraMem language model (~10 minutes on 2 cores), print its validation loss next
# to the dense sibling's (if runs/dense-small was trained earlier: `ultramem train configs/dense-small.json`),
# and print a generated sample.
#   bash scripts/main.sh            full run
#   bash scripts/main.sh --quick    a few-minute run (fewer steps, own output folder)
set -euo pipefail
cd "$(dirname "$0")/.."

config=configs/ultramem-small.json
out=runs/ultramem-small
extra=()
if [ "${1:-}" = "--quick" ]; then
  out=runs/quick-ultramem-small
  extra=(--steps 60 --eval-every 30 --log-every 10)
  shift
fi

bash scripts/build.sh
bash scripts/fetch_corpus.sh
um=./build/release/ultramem
$um prepare
$um info "$config"

if [ -f "$out/run.json" ] && grep -q '"final"' "$out/run.json"; then
  echo "main: $out is already trained (delete it to train again)"
elif [ -f "$out/checkpoint.safetensors" ]; then
  $um train "$config" --out "$out" --resume "${extra[@]}" --compare runs/dense-small "$@"
else
  $um train "$config" --out "$out" "${extra[@]}" --compare runs/dense-small "$@"
fi

echo
echo "== sample =="
$um generate "$out/checkpoint.safetensors" --prompt "The state of the Union" --max-tokens 80 --seed 1
