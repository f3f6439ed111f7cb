#!/usr/bin/env bash
# A bounded fuzzing run for CTest: run_bounded.sh FUZZER RUNS SECONDS SEED_DIR...
# Fuzzes from the seeds into a scratch corpus (new inputs never land in the repository); a crash is written
# to the test's working directory (build/asan/tests/fuzz/crash-*) and fails the test.
set -euo pipefail
bin=$1 runs=$2 secs=$3
shift 3
work=$(mktemp -d "${TMPDIR:-/tmp}/ultramem-fuzz-corpus-XXXXXX")
trap 'rm -rf "$work"' EXIT
"$bin" -seed=1 -runs="$runs" -max_total_time="$secs" -timeout=30 -rss_limit_mb=4096 -max_len=65536 \
  -artifact_prefix="$PWD/$(basename "$bin")-" -print_final_stats=1 "$work" "$@"
