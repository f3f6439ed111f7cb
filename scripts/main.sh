#!/usr/bin/env bash
# The main job: install, build, fetch and prepare the default corpus (State of the Union addresses),
# train the default UltraMem language model (~10 minutes on 2 cores), print its validation loss next
# to the dense sibling's when runs/dense-small was trained earlier with the same settings (the command
# is printed at the end), and print a generated sample.
#   bash scripts/main.sh            full run
#   bash scripts/main.sh --quick    a few-minute run (fewer steps, own output folder)
set -euo pipefail
cd "$(dirname "$0")/.."

config=configs/ultramem-small.json
out=runs/ultramem-small
dense_out=runs/dense-small
# 600 steps of 8 x 128 tokens: ~0.6M tokens, about 10 minutes at the ~1,200 tokens/s measured here.
settings=(--steps 600 --lr 1e-3 --set warmup_steps=30 --eval-every 100 --log-every 20)
if [ "${1:-}" = "--quick" ]; then
  out=runs/quick-ultramem-small
  dense_out=runs/quick-dense-small
  settings=(--steps 60 --lr 1e-3 --set warmup_steps=6 --eval-every 30 --log-every 10)
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
  $um train "$config" --out "$out" --resume "${settings[@]}" --compare "$dense_out" "$@"
else
  $um train "$config" --out "$out" "${settings[@]}" --compare "$dense_out" "$@"
fi
if [ ! -f "$dense_out/run.json" ]; then
  echo "main: to compare with the dense sibling at equal compute, train it with the same settings:"
  echo "  $um train configs/dense-small.json --out $dense_out ${settings[*]}"
fi

echo
echo "== sample =="
$um generate "$out/checkpoint.safetensors" --prompt "The state of the Union" --max-tokens 80 --seed 1
