#!/usr/bin/env bash
# The project's test command: install, build, run the whole CTest suite (C++ and Python tests), then the
# sanitizer part: the asan preset (clang-14, AddressSanitizer + UBSan, every finding fatal) builds only the
# kernel and data tests and the fuzz harnesses and runs them (the tests labelled "sanitize", each fuzz
# target's seeds, regressions and a bounded fuzzing run; docs/fuzzing.md). ULTRAMEM_ASAN=0 skips that part.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
ctest --preset release "$@"
if [ "${ULTRAMEM_ASAN:-1}" != 0 ]; then
  cmake --preset asan >/dev/null
  cmake --build --preset asan
  ctest --preset asan
fi
