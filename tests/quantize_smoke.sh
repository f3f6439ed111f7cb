#!/usr/bin/env bash
# `ultramem quantize` and memory-mapped eval / generate end to end on a tiny corpus: quantise a trained
# UltraMem model to bf16 and int8 (loss before / after / delta as a JSON line), evaluate and generate
# from the quantised checkpoints with and without --mmap, compact keys (--keys), and the errors for bad
# input.
# Usage: quantize_smoke.sh PATH/TO/ultramem
set -euo pipefail
um="$1"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
source "$(dirname "$0")/smoke_lib.sh"
council_corpus "$work/corpus" 6 100
"$um" --threads 1 prepare --input "$work/corpus" --out "$work/data" --vocab 300 --val-fraction 0.25 >/dev/null
cat > "$work/model.json" <<'JSON'
{"model": {"name": "q-tiny", "vocab_size": 300, "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32,
           "ffn_hidden": 64, "memory": {"kind": "ultramem", "placement": "1:2",
           "ultramem": {"n": 16, "E": 4, "Dk": 8, "Dv": 16, "r": 2, "C": 2, "H": 2, "m": 4}}},
 "train": {"steps": 8, "batch_size": 4, "seq_len": 32, "lr": 0.003, "eval_every": 8, "eval_batches": 2,
           "log_every": 4, "checkpoint_every": 0}}
JSON
"$um" --threads 1 train "$work/model.json" --data "$work/data" --out "$work/run" >/dev/null
ck="$work/run/checkpoint.safetensors"

"$um" quantize --help | grep -q -- "--values" || fail "quantize --help"
for fmt in bf16 int8; do
  out=$("$um" --threads 1 quantize "$ck" --values $fmt --max-batches 2 2>/dev/null)
  json=$(tail -n 1 <<<"$out")
  for key in val_loss_before val_loss_after val_loss_delta value_mib_after; do
    grep -q "\"$key\"" <<<"$json" || fail "quantize $fmt JSON lacks $key: $json"
  done
  grep -q "validation loss:" <<<"$out" || fail "quantize $fmt prints no loss line"
  q="$work/run/checkpoint.$fmt.safetensors"
  [ -f "$q" ] || fail "quantize $fmt wrote no $q"
  for mm in "" "--mmap"; do
    ev=$("$um" --threads 1 eval "$q" --batch-size 2 --max-batches 2 $mm)
    grep -q "\"value_format\": \"$fmt\"" <<<"$ev" || fail "eval $fmt $mm: $ev"
    grep -q '"first_batch_ms"' <<<"$ev" || fail "eval $fmt $mm lacks first_batch_ms"
    gen=$("$um" --threads 1 generate "$q" --prompt "Member" --max-tokens 6 --seed 1 $mm 2>"$work/gen.err")
    [ -n "$gen" ] || fail "generate $fmt $mm printed nothing"
    grep -q "tokens/s" "$work/gen.err" || fail "generate $fmt $mm printed no speed: $(cat "$work/gen.err")"
  done
done
# The same greedy text from the mapped and the loaded int8 checkpoint.
a=$("$um" --threads 1 generate "$work/run/checkpoint.int8.safetensors" --prompt "Member" --max-tokens 8 --temperature 0 2>/dev/null)
b=$("$um" --threads 1 generate "$work/run/checkpoint.int8.safetensors" --prompt "Member" --max-tokens 8 --temperature 0 --mmap 2>/dev/null)
[ "$a" = "$b" ] || fail "mmap changed the greedy text: '$a' vs '$b'"
# No data: the comparison is skipped with a note, the checkpoint still written.
"$um" --threads 1 quantize "$ck" --values bf16 --no-eval --out "$work/noeval.safetensors" | grep -q "wrote" || fail "--no-eval"

# Compact keys: recorded in the checkpoint, used by eval unless --keys overrides, with the agreement
# and the loss change reported.
out=$("$um" --threads 1 quantize "$ck" --keys int8 --max-batches 2 2>/dev/null)
json=$(tail -n 1 <<<"$out")
json_has "quantize --keys" "$json" '"keys":"int8"' '"key_agreement"' '"val_loss_delta"' '"values":"fp32"'
kq="$work/run/checkpoint.keys-int8.safetensors"
[ -f "$kq" ] || fail "quantize --keys wrote no $kq"
ev=$("$um" --threads 1 eval "$kq" --batch-size 2 --max-batches 2)
grep -q '"key_format": "int8"' <<<"$ev" || fail "eval of a keys-int8 checkpoint: $ev"
grep -q '"key_loss_change"' <<<"$ev" || fail "eval with int8 keys lacks key_loss_change"
grep -q '"mem0.key_agreement"' <<<"$ev" || fail "eval with int8 keys lacks key_agreement"
ev=$("$um" --threads 1 eval "$kq" --batch-size 2 --max-batches 2 --keys fp32)
grep -q '"key_format": "fp32"' <<<"$ev" || fail "eval --keys fp32 did not override: $ev"
"$um" --threads 1 quantize "$ck" --values int8 --keys bf16 --no-eval | grep -q "checkpoint.int8.keys-bf16.safetensors" \
  || fail "quantize --values int8 --keys bf16: default output name"
# Compact dense matrices: the weights rounded and the format recorded; eval of the result reproduces
# quantize's loss after; generate decodes with them, and --weights fp32 reads the rounded weights as floats.
out=$("$um" --threads 1 quantize "$ck" --weights int8 --max-batches 2 2>/dev/null)
json=$(tail -n 1 <<<"$out")
json_has "quantize --weights" "$json" '"weights":"int8"' '"weights_before":"fp32"' '"compact_weight_mib"' '"val_loss_delta"'
wq="$work/run/checkpoint.weights-int8.safetensors"
[ -f "$wq" ] || fail "quantize --weights wrote no $wq"
after=$(grep -o '"val_loss_after":[^,}]*' <<<"$json" | cut -d: -f2)
ev=$("$um" --threads 1 eval "$wq" --batch-size 8 --max-batches 2)
grep -q '"weight_format": "int8"' <<<"$ev" || fail "eval of a weights-int8 checkpoint: $ev"
grep -qF "\"val_loss\": $after," <<<"$ev" || fail "eval of $wq does not reproduce quantize's val_loss_after $after: $ev"
a=$("$um" --threads 1 generate "$wq" --prompt "Member" --max-tokens 8 --temperature 0 2>/dev/null)
[ -n "$a" ] || fail "generate from the weights-int8 checkpoint printed nothing"
"$um" --threads 1 eval "$wq" --batch-size 2 --max-batches 1 --weights fp32 | grep -q '"weight_format": "fp32"' \
  || fail "eval --weights fp32 did not override"
expect_error "--weights" "$um" quantize "$ck" --weights fp32
expect_error "already rounded to int8" "$um" quantize "$wq" --weights bf16 --out "$work/y.safetensors"
# Another retrieval filter at evaluation than the trained one.
ev=$("$um" --threads 1 eval "$ck" --batch-size 2 --max-batches 2 --filter two_sign)
grep -q '"filter": "two_sign"' <<<"$ev" || fail "eval --filter two_sign: $ev"
expect_error "m_neg" "$um" eval "$ck" --batch-size 2 --max-batches 2 --filter two_sign --m-neg 99
expect_error "apply with --filter" "$um" eval "$ck" --m-neg 2
expect_error "nothing to do" "$um" quantize "$ck"
expect_error "value format" "$um" quantize "$ck" --keys int4

expect_error "already int8" "$um" quantize "$work/run/checkpoint.int8.safetensors" --values bf16 --out "$work/x.safetensors"
expect_error "bf16 or int8" "$um" quantize "$ck" --values fp32
expect_error "value format" "$um" quantize "$ck" --values int4
expect_error "is the input checkpoint" "$um" quantize "$ck" --values int8 --out "$ck"
echo "quantize_smoke: 1 passed, 0 failed"
