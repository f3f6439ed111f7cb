#!/usr/bin/env bash
# `ultramem experiment --quick` end to end: every shipped suite's quick variant trains on a tiny corpus
# (language-modelling suites) or the synthetic fact task, writes results.md / results.json / charts,
# and a second invocation skips the finished runs.
# Usage: experiment_smoke.sh PATH/TO/ultramem   (run from the repository root)
set -euo pipefail
um="$1"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

mkdir -p "$work/corpus"
for d in 1 2 3 4 5 6 7 8; do
  for i in $(seq 1 150); do
    echo "Member $d of the council read item $((i % 9)) and the clerk filed report $((i % 5)) today."
  done > "$work/corpus/doc$d.txt"
done
"$um" --threads 1 prepare --input "$work/corpus" --out "$work/data" --vocab 300 --val-fraction 0.25 >/dev/null

for suite in compare ablation scaling capacity retrieval retrieval_long; do
  out="$work/$suite"
  log=$("$um" --threads 1 experiment "$suite" --quick --data "$work/data" --out "$out" 2>&1) || { echo "$log"; fail "$suite --quick"; }
  [ -s "$out/results.md" ] || fail "$suite: no results.md"
  [ -s "$out/results.json" ] || fail "$suite: no results.json"
  grep -q "^| " "$out/results.md" || fail "$suite: results.md has no table"
  ncases=$(/usr/bin/python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(len(d['cases']))" "$out/results.json")
  [ "$ncases" -ge 2 ] || fail "$suite: expected at least 2 cases, got $ncases"
  /usr/bin/python3 - "$out/results.json" <<'PY' || fail "$suite: results.json lacks finite losses"
import json, math, sys
d = json.load(open(sys.argv[1]))
for c in d["cases"]:
    assert math.isfinite(c["final"]["val_loss"]), c
    if d["analysis"] == "capacity":
        assert 0.0 <= c["final"]["recall"] <= 1.0, c
PY
  if command -v gnuplot >/dev/null; then [ -s "$out/curves.png" ] || fail "$suite: no curves.png"; fi
done
[ -s "$work/scaling/scaling.png" ] || ! command -v gnuplot >/dev/null || fail "scaling: no scaling.png"
# Chart style: legends outside the data, one style per series, seed means with their range (the quick
# compare suite trains 2 seeds), and a one-seed chart that says so.
if command -v gnuplot >/dev/null; then
  gp="$work/compare/curves.gp"
  grep -q "set key outside" "$gp" || fail "curves.gp: legend not outside the data"
  grep -qF 'yerrorlines linestyle 1 title "Dense (mean of 2 seeds, range)"' "$gp" || fail "curves.gp: no seed mean with range: $(cat "$gp")"
  grep -qE 'linestyle 2 title "UltraMem[^"]* \(mean of 2 seeds, range\)"' "$gp" || fail "curves.gp: series share a style: $(cat "$gp")"
  grep -qF '"runs (1 seed)"' "$work/scaling/scaling.gp" || fail "scaling.gp: a one-seed chart claims a mean"
fi

# A second run trains nothing: every case is read back.
again=$("$um" --threads 1 experiment compare --quick --data "$work/data" --out "$work/compare" 2>&1)
grep -q "done earlier" <<<"$again" || fail "rerun did not skip finished cases: $again"
if grep -q "activated, .* MFLOP/token; " <<<"$again"; then fail "rerun trained again"; fi

# A suite folder moved elsewhere still reports (where a case lives is not part of what it is), and the
# report names the revision read when the invocation started.
cp -r "$work/compare" "$work/compare_moved"
moved=$("$um" experiment compare --quick --data "$work/data" --out "$work/compare_moved" --report-only 2>&1) ||
  fail "report of a moved suite folder: $moved"
grep -q "(when this invocation started)" "$work/compare_moved/results.md" || fail "results.md lacks the revision note"

# Errors name the problem.
if out=$("$um" experiment no_such_suite 2>&1); then fail "unknown suite accepted"; fi
grep -q "known suites" <<<"$out" || fail "unknown suite error lacks the list: $out"
echo "experiment_smoke: passed"
