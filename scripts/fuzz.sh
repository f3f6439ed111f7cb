#!/usr/bin/env bash
# Runs the libFuzzer harnesses of tests/fuzz longer than CTest does (docs/fuzzing.md).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'USAGE'
Usage: scripts/fuzz.sh [TARGET|all] [SECONDS]     fuzz TARGET (default: all, one after another) for SECONDS
                                                  each (default 300)
       scripts/fuzz.sh --list                     list the targets
       scripts/fuzz.sh --seeds                    rewrite the seed corpora and fixtures with the project's writers
       scripts/fuzz.sh --help

Builds the asan preset (clang-14, AddressSanitizer + UBSan, every finding fatal) first. Each target keeps its
corpus across runs in build/asan/fuzz/<target>/corpus (started from tests/fuzz/corpus/<target>, which is not
written to); a crash, sanitizer report, undocumented exception or hang stops the run and leaves the input in
build/asan/fuzz/<target>/crash-* (or timeout-*, oom-*). Replay one with build/asan/tests/fuzz/fuzz_<target>
<file>; keep it as a test by copying it to tests/fuzz/regressions/<target>/ (CTest replays that folder).
Extra libFuzzer flags go through FUZZ_FLAGS, e.g. FUZZ_FLAGS="-jobs=2 -workers=2".
USAGE
}

TARGETS=(safetensors checkpoint checkpoint_manifest shard manifest tokenizer model_config train_config json_file openai_api)
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  --list) printf '%s\n' "${TARGETS[@]}"; exit 0 ;;
esac

cmake --preset asan >/dev/null
if [ "${1:-}" = "--seeds" ]; then
  cmake --build --preset asan --target fuzz_make_seeds
  ASAN_OPTIONS=detect_leaks=0 build/asan/tests/fuzz/fuzz_make_seeds tests/fuzz configs
  echo "fuzz.sh: seeds rewritten under tests/fuzz/corpus and tests/fuzz/fixtures"
  exit 0
fi

target=${1:-all}
seconds=${2:-300}
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
  echo "fuzz.sh: SECONDS must be a positive integer, got '$seconds'" >&2; exit 2
fi
if [ "$target" = all ]; then
  run=("${TARGETS[@]}")
else
  [[ " ${TARGETS[*]} " == *" $target "* ]] || { echo "fuzz.sh: unknown target '$target' (--list)" >&2; exit 2; }
  run=("$target")
fi

cmake --build --preset asan --target "${run[@]/#/fuzz_}"
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:strict_string_checks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
status=0
for t in "${run[@]}"; do
  out=build/asan/fuzz/$t
  mkdir -p "$out/corpus"
  echo "fuzz.sh: $t for ${seconds} s (corpus $out/corpus)"
  inputs=("$out/corpus" "tests/fuzz/corpus/$t")
  [ -d "tests/fuzz/regressions/$t" ] && inputs+=("tests/fuzz/regressions/$t")
  # shellcheck disable=SC2086
  if ! "build/asan/tests/fuzz/fuzz_$t" -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 -max_len=65536 \
       -artifact_prefix="$out/" -print_final_stats=1 ${FUZZ_FLAGS:-} "${inputs[@]}"; then
    echo "fuzz.sh: $t: finding, input in $out/" >&2
    status=1
  fi
done
exit $status
