#!/usr/bin/env bash
# Value tables served from disk end to end (issue 17): `export-tables` writes a trained model's tables as
# files, eval and generate serve them behind a small row cache (--value-tables, --value-cache-gib) with the
# greedy text of the int8 checkpoint, `bench tiered --quick` prints its cases and targets and removes its
# table (or keeps and reuses it), and bad input gets clear errors (a disk too small for the table included).
# Usage: tiered_smoke.sh PATH/TO/ultramem
set -euo pipefail
um="$1"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
source "$(dirname "$0")/smoke_lib.sh"
council_corpus "$work/corpus" 4 80
"$um" --threads 1 prepare --input "$work/corpus" --out "$work/data" --vocab 300 --val-fraction 0.25 >/dev/null
cat > "$work/model.json" <<'JSON'
{"model": {"name": "t-tiny", "vocab_size": 300, "d_model": 32, "n_layers": 3, "n_heads": 2, "max_seq_len": 32,
           "ffn_hidden": 64, "memory": {"kind": "ultramem", "placement": "1:3",
           "ultramem": {"n": 128, "E": 4, "Dk": 8, "Dv": 16, "r": 2, "C": 2, "H": 2, "m": 4,
                        "permutation_key": 77}}},
 "train": {"steps": 6, "batch_size": 4, "seq_len": 32, "lr": 0.003, "eval_every": 6, "eval_batches": 2,
           "log_every": 3, "checkpoint_every": 0}}
JSON
"$um" --threads 1 train "$work/model.json" --data "$work/data" --out "$work/run" >/dev/null
ck="$work/run/checkpoint.safetensors"

"$um" export-tables --help | grep -q -- "--format" || fail "export-tables --help"
out=$("$um" --threads 1 export-tables "$ck" --out "$work/tables" 2>/dev/null)
grep -qF '"rows":4096' <<<"$out" || fail "export-tables summary: $out"
[ -f "$work/tables/memories.0.table" ] || fail "no table file: $(ls "$work/tables")"
"$um" --threads 1 quantize "$ck" --values int8 --no-eval >/dev/null
a=$("$um" --threads 1 generate "$work/run/checkpoint.int8.safetensors" --prompt "Member" --max-tokens 8 --temperature 0 2>/dev/null)
b=$("$um" --threads 1 generate "$ck" --prompt "Member" --max-tokens 8 --temperature 0 --value-tables "$work/tables" \
     --value-cache-gib 0.0002 2>"$work/gen.err")
[ -n "$a" ] && [ "$a" = "$b" ] || fail "the table files changed the greedy text: '$a' vs '$b'"
grep -q "serving 1 value table(s) from the files" "$work/gen.err" || fail "generate says nothing of its tables: $(cat "$work/gen.err")"
ev=$("$um" --threads 1 eval "$ck" --batch-size 2 --max-batches 2 --value-tables "$work/tables" 2>/dev/null)
grep -q '"val_loss"' <<<"$ev" || fail "eval --value-tables: $ev"
expect_error "--value-cache-gib must be in (0, 1024]" "$um" --threads 1 eval "$ck" --value-tables "$work/tables" --value-cache-gib 0
expect_error "--value-tables" "$um" --threads 1 generate "$ck" --prompt x --value-tables "$work/missing"
expect_error "memories.0.table" "$um" --threads 1 generate "$ck" --prompt x --value-tables "$work/corpus"
expect_error "--format" "$um" export-tables "$ck" --out "$work/t2" --format fp16
expect_error "export from the float32" "$um" export-tables "$work/run/checkpoint.int8.safetensors" --out "$work/t3"

# bench tiered --quick: cases, ratios, targets; the table removed, or kept and reused.
out=$("$um" bench tiered --quick --dir "$work/bench" --plot "$work/plot" 2>/dev/null)
for key in '"case":"tiered","traffic":"zipf"' '"case":"tiered","traffic":"uniform"' '"case":"in_ram"' \
           '"warm":"zipf"' '"stall_hidden"' '"case":"tiered","traffic":"resident"' '"hit_rate"' '"ratio":"tiered_zipf_over_in_ram"' '"removed":true' \
           '"target":"resident memory'; do
  grep -qF -- "$key" <<<"$out" || fail "bench tiered --quick lacks $key: $out"
done
[ "$(grep -c '"target"' <<<"$out")" -ge 4 ] || fail "bench tiered: fewer than 4 target lines"
grep '"target"' <<<"$out" | grep -qv '"met"' && fail "a target line without met"
[ -z "$(ls "$work/bench")" ] || fail "bench tiered left files: $(ls "$work/bench")"
[ -f "$work/plot/tiered_latency.png" ] || fail "bench tiered drew no chart"
out=$("$um" bench tiered --quick --dir "$work/bench" --keep --traffic zipf 2>/dev/null)
grep -qF '"kept":true' <<<"$out" || fail "--keep: $out"
table="$work/bench/ultramem-bench-tiered-20.table"
[ -f "$table" ] || fail "--keep left no table"
out=$("$um" bench tiered --quick --dir "$work/bench" --traffic uniform 2>/dev/null)
grep -qF '"reused":true' <<<"$out" || fail "a kept table is not reused: $out"
out=$("$um" bench tiered --quick --table "$table" --traffic uniform 2>/dev/null)
grep -qF '"given":true' <<<"$out" || fail "--table: $out"
[ -f "$table" ] || fail "a --table file was removed"
expect_error "GiB are free" "$um" bench tiered --log2-slots 32 --dir "$work/bench"
expect_error "--log2-slots must be even and in [12, 32]" "$um" bench tiered --log2-slots 34
expect_error "--log2-slots must be even" "$um" bench tiered --log2-slots 21
expect_error "--batches" "$um" bench tiered --batches 0
expect_error "--traffic" "$um" bench tiered --traffic pareto
expect_error "--cache-gib" "$um" bench tiered --cache-gib 0
expect_error "this run needs" "$um" bench tiered --table "$table"
echo "tiered smoke: ok"
