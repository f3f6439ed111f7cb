#!/usr/bin/env bash
# The `ultramem` command end to end on a tiny corpus: prepare, info, train with stop + resume, eval,
# generate, and clear errors (non-zero exit, a message naming the problem) for bad input.
# Usage: cli_smoke.sh PATH/TO/ultramem
set -euo pipefail
um="$1"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
source "$(dirname "$0")/smoke_lib.sh"

mkdir -p "$work/corpus"
for d in 1 2 3 4 5 6 7 8; do
  for i in $(seq 1 120); do
    echo "The people of district $d will vote on measure $((i % 7)) in the spring session."
  done > "$work/corpus/doc$d.txt"
done

"$um" --help | grep >/dev/null "generate" || fail "--help does not list subcommands"
"$um" prepare --input "$work/corpus" --out "$work/data" --vocab 300 --val-fraction 0.25 | grep >/dev/null "prepared" || fail "prepare"
"$um" prepare --input "$work/corpus" --out "$work/data" --vocab 300 --val-fraction 0.25 | grep >/dev/null "reused" || fail "prepare rerun did not reuse"

cat > "$work/model.json" <<'JSON'
{"model": {"name": "cli-tiny", "vocab_size": 300, "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32,
           "ffn_hidden": 64, "ffn": ["dense", "moe"], "moe": {"num_experts": 4, "top_k": 2},
           "memory": {"kind": "ultramem", "placement": "1:2",
                      "ultramem": {"n": 8, "E": 4, "Dk": 8, "Dv": 16, "r": 2, "C": 2, "H": 2, "m": 4}}},
 "train": {"steps": 12, "batch_size": 4, "seq_len": 32, "lr": 0.003, "eval_every": 6, "eval_batches": 2,
           "log_every": 4, "checkpoint_every": 0}}
JSON
"$um" info "$work/model.json" | grep >/dev/null "memory_values" || fail "info lacks the memory part"
"$um" info "$work/model.json" --json | grep >/dev/null "params_activated" || fail "info --json"

"$um" train "$work/model.json" --data "$work/data" --out "$work/run" --stop-at 6 | grep >/dev/null "continue with --resume" || fail "stop-at"
expect_error "exists: pass --resume" "$um" train "$work/model.json" --data "$work/data" --out "$work/run"
"$um" train "$work/model.json" --data "$work/data" --out "$work/run" --resume | grep >/dev/null "final: step 12" || fail "resume"
grep -q '"val_loss"' "$work/run/metrics.jsonl" || fail "metrics.jsonl has no val_loss"

"$um" eval "$work/run/checkpoint.safetensors" --batch-size 2 --seq-len 32 | grep >/dev/null '"bits_per_byte"' || fail "eval"
# export --format hf (the folder itself is tested from Python, tests/python/test_package.py): bad flags.
expect_error "--format is required" "$um" export "$work/run/checkpoint.safetensors" "$work/hf"
expect_error "--format: onnx not in {hf}" "$um" export "$work/run/checkpoint.safetensors" "$work/hf" --format onnx
expect_error "not a safetensors file" "$um" export "$work/model.json" "$work/hf" --format hf
# Every numeric flag meets the same validation as the config: nothing is silently replaced by a default.
for bad in "--steps 0|steps" "--lr -1|lr" "--lr nan|--lr" "--batch-size 0|batch_size" "--batch-size -4|batch_size" \
           "--grad-accum 0|grad_accum" "--eval-every -5|eval_every" "--stop-at -3|--stop-at" "--seed -7|seed" \
           "--dist-timeout 0|--dist-timeout" "--dist-timeout -5|--dist-timeout"; do
  flags="${bad%%|*}"; needle="${bad##*|}"
  # shellcheck disable=SC2086
  expect_error "$needle" "$um" train "$work/model.json" --data "$work/data" --out "$work/never" $flags
done
[ ! -e "$work/never" ] || fail "a refused train flag still created its run folder"
for bad in "--nproc 0|--nproc" "--nproc -2|--nproc" "--nnodes 0|--nnodes" "--node-rank -1|--node-rank" \
           "--world-size 0|--world-size" "--rank -1|--rank"; do
  flags="${bad%%|*}"; needle="${bad##*|}"
  # shellcheck disable=SC2086
  expect_error "$needle" "$um" train "$work/model.json" --data "$work/data" --out "$work/never" $flags
done
[ ! -e "$work/never" ] || fail "a refused train flag still created its run folder"
expect_error "--seed" "$um" generate "$work/run/checkpoint.safetensors" --prompt "The" --seed -1
expect_error "--batch" "$um" generate "$work/run/checkpoint.safetensors" --prompt "The" --batch 0
expect_error "--seq-len" "$um" eval "$work/run/checkpoint.safetensors" --seq-len -5
expect_error "--max-batches" "$um" eval "$work/run/checkpoint.safetensors" --max-batches -1
expect_error "--max-batches" "$um" quantize "$work/run/checkpoint.safetensors" --values int8 --max-batches -1
expect_error "--seq-len" "$um" quantize "$work/run/checkpoint.safetensors" --values int8 --seq-len -1
expect_error "--seed" "$um" prepare --input "$work/corpus" --out "$work/never" --seed -1
expect_error "--context" "$um" info "$work/model.json" --context -1
expect_error "--threads" "$um" --threads 0 info "$work/model.json"
[ ! -e "$work/never" ] || fail "a refused flag still created a folder"
gen=$("$um" generate "$work/run/checkpoint.safetensors" --prompt "The people" --max-tokens 10 --seed 3)
[ -n "$gen" ] || fail "generate printed nothing"
# Several prompts, batched: one JSON line per non-empty line, in order; the duplicate prompt decodes to
# the same greedy text; stdin works too.
printf 'The people\n\nThe council\nThe people\n' > "$work/prompts.txt"
lines=$("$um" --threads 1 generate "$work/run/checkpoint.safetensors" --prompts-file "$work/prompts.txt" --batch 2 \
  --max-tokens 6 --temperature 0 2>/dev/null)
[ "$(wc -l <<<"$lines")" -eq 3 ] || fail "--prompts-file: expected 3 JSON lines: $lines"
grep -q '"index":2,"prompt":"The people","stop_reason":"max_tokens","tokens":6' <<<"$lines" || fail "--prompts-file: $lines"
c0=$(sed -n 1p <<<"$lines" | grep -o '"completion":"[^"]*"'); c2=$(sed -n 3p <<<"$lines" | grep -o '"completion":"[^"]*"')
[ "$c0" = "$c2" ] || fail "--prompts-file: the same prompt decoded differently: $c0 vs $c2"
"$um" --threads 1 generate "$work/run/checkpoint.safetensors" --prompts-file - --max-tokens 2 <<<"The" 2>/dev/null \
  | grep >/dev/null '"index":0' || fail "--prompts-file - (stdin)"
# The skip-window prefetch (memory placed 1:2) leaves the greedy text as it is and is reported.
pf=$("$um" --threads 1 generate "$work/run/checkpoint.safetensors" --prompts-file "$work/prompts.txt" --batch 2 \
  --max-tokens 6 --temperature 0 --value-prefetch 65536 2>"$work/pf.err")
[ "$pf" = "$lines" ] || fail "--value-prefetch changed the text: $pf vs $lines"
grep -q '"value_prefetch_bytes":65536' "$work/pf.err" || fail "--value-prefetch not reported: $(cat "$work/pf.err")"
expect_error "value-prefetch" "$um" generate "$work/run/checkpoint.safetensors" --prompt x --value-prefetch -1
expect_error "--prompt or --prompts-file" "$um" generate "$work/run/checkpoint.safetensors"
expect_error "no prompts" "$um" generate "$work/run/checkpoint.safetensors" --prompts-file /dev/null

# Bad input: each fails with a message naming the problem.
echo '{"name": "x", "vocab_size": 300, "d_modle": 32}' > "$work/bad_key.json"
expect_error "d_modle" "$um" info "$work/bad_key.json"
# Sizes far beyond any machine are refused at once, naming the field (n_layers 2^63-1 used to hang info,
# train and eval); a valid model whose training would not fit in memory is refused with the size it needs.
echo '{"name": "x", "vocab_size": 300, "d_model": 32, "n_layers": 9223372036854775807, "n_heads": 2}' > "$work/huge.json"
expect_error "n_layers: must be <= 1024" timeout 60 "$um" info "$work/huge.json"
expect_error "of activations" "$um" train "$work/model.json" --data "$work/data" --out "$work/never" --batch-size 1000000
[ ! -e "$work/never" ] || fail "a run refused for its memory created its run folder"
# JSON errors name the file and the key; a key given twice is refused (the last one used to win silently).
echo '{"name": "x", "name": "y", "vocab_size": 300}' > "$work/dup.json"
expect_error 'dup.json: duplicate key "name"' "$um" info "$work/dup.json"
echo '{"model": {"name": "x", "memory": {"kind": "pkm", "kind": "ultramem"}}}' > "$work/dup2.json"
expect_error 'duplicate key "model.memory.kind"' "$um" info "$work/dup2.json"
echo '{"model": 5}' > "$work/model5.json"
expect_error "model5.json: model: expected an object, got number" "$um" info "$work/model5.json"
echo '{"model": {"name": "x", "vocab_size": 300, "d_model": 32, "n_layers": 2, "n_heads": 2}, "train": 5}' > "$work/train5.json"
expect_error "train5.json: train: expected an object, got number" "$um" train "$work/train5.json" --data "$work/data" --out "$work/never"
echo '{"model": {"name": "x", "vocab_size": 300, "d_model": 32, "n_layers": 2, "n_heads": 2}, "train": {"lr": "big"}}' > "$work/lr.json"
expect_error "lr.json (with the command's flags): TrainConfig.lr" "$um" train "$work/lr.json" --data "$work/data" --out "$work/never"
[ ! -e "$work/never" ] || fail "a refused config still created its run folder"
expect_error "nonsense" "$um" train "$work/model.json" --data "$work/data" --out "$work/bad" --set nonsense=1
expect_error "manifest" "$um" train "$work/model.json" --data "$work/nowhere" --out "$work/bad2"
cp "$work/run/checkpoint.safetensors" "$work/trunc.safetensors"
truncate -s -100 "$work/trunc.safetensors"
expect_error "trunc.safetensors" "$um" eval "$work/trunc.safetensors" --data "$work/data"
expect_error "top_p" "$um" generate "$work/run/checkpoint.safetensors" --prompt x --top-p 0
expect_error "E: must be a square" "$um" layer-demo --E 3
for bad in "--tokens 0|--tokens" "--tokens -5|--tokens" "--steps -1|--steps" "--lr -1|--lr" "--lr nan|--lr" \
           "--seed -1|--seed"; do
  # shellcheck disable=SC2086
  expect_error "${bad##*|}" "$um" layer-demo ${bad%%|*}
done
for bad in "--case-seconds -1|--case-seconds" "--max-mem-gib -1|--max-mem-gib" "--max-log2-n -2|--max-log2-n" \
           "--min-case-seconds -1|--min-case-seconds"; do
  # shellcheck disable=SC2086
  expect_error "${bad##*|}" "$um" bench decode --quick ${bad%%|*}
done
echo "cli_smoke: 1 passed, 0 failed"

# The command's own rough edges (issue: one room per job).
# --threads after the subcommand is the global option, not the config path.
"$um" info --threads 1 "$work/model.json" | grep >/dev/null "memory_values" || fail "--threads after the subcommand"
"$um" --version | grep >/dev/null "kernels .*libtorch" || fail "--version lacks the kernel ISA and libtorch version"
expect_error "unknown command 'trian'" "$um" trian "$work/model.json"
expect_error "train, eval" "$um" trian "$work/model.json"
# A run folder is self-contained: eval and generate work from another working directory.
(cd / && "$um" eval "$work/run/checkpoint.safetensors" --batch-size 2 --seq-len 32 --max-batches 1 | grep >/dev/null '"val_loss"') \
  || fail "eval from another working directory"
[ -f "$work/run/tokenizer.model" ] || fail "the run folder lacks its tokenizer"
(cd / && "$um" generate "$work/run/checkpoint.safetensors" --prompt "The" --max-tokens 4 --seed 1 >/dev/null 2>&1) \
  || fail "generate from another working directory"
# Generation that fills the context says so (stderr and the JSON line).
gerr=$("$um" generate "$work/run/checkpoint.safetensors" --prompt "The people" --max-tokens 100 --temperature 0 2>&1 >/dev/null)
grep -qF "reaches the model's context of 32 tokens" <<<"$gerr" || fail "generate past the context does not say so: $gerr"
grep -qE '"stop_reason":"(context_full|eos)"' <<<"$gerr" || fail "generate's JSON line lacks the stop reason: $gerr"
if grep -qF '"stop_reason":"context_full"' <<<"$gerr"; then
  grep -qF "tokens is full" <<<"$gerr" || fail "generate stopped at a full context without saying so: $gerr"
fi
# --plan needs no prepared data.
src_dir=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$work/plan"
plan=$(cd "$work/plan" && "$um" experiment "$src_dir/experiments/compare.json" --plan 2>&1) || fail "--plan without data: $plan"
grep -q "ultramem prepare --vocab 2048" <<<"$plan" || fail "--plan without data names no prepare command: $plan"
grep -q "MFLOP/token" <<<"$plan" || fail "--plan without data printed no plan: $plan"
echo "cli smoke: ok"
