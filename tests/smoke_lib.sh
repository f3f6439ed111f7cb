# Helpers the smoke scripts share (sourced, not run).

# fail MESSAGE: print it and stop the script.
fail() { echo "FAIL: $*" >&2; exit 1; }

# expect_error "needle" cmd...: the command must fail and print the needle.
expect_error() {
  local needle="$1"; shift
  if out=$("$@" 2>&1); then fail "expected an error from: $*"; fi
  grep -qF -- "$needle" <<<"$out" || fail "error of '$*' lacks \"$needle\": $out"
}

# json_has WHAT JSON KEY...: every KEY (a fixed string) occurs in JSON.
json_has() {
  local what="$1" json="$2"; shift 2
  for key in "$@"; do grep -qF -- "$key" <<<"$json" || fail "$what JSON lacks $key: $json"; done
}

# council_corpus DIR DOCS LINES: DOCS small text files of LINES repetitive sentences each in DIR.
council_corpus() {
  mkdir -p "$1"
  for d in $(seq 1 "$2"); do
    for i in $(seq 1 "$3"); do echo "Member $d asked the council about road $((i % 5)) and the budget for year $((i % 3))."; done \
      > "$1/doc$d.txt"
  done
}
