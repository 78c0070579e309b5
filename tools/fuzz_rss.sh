#!/usr/bin/env bash
# Peak resident memory of each fuzz target over its corpus (issue 15 item 2): builds the targets without a
# sanitizer (ASan's shadow memory and quarantine would dominate) and runs every input of
# fuzz/corpus/TARGET and fuzz/seeds/TARGET once, in batches of 200 inputs per process, under /usr/bin/time.
# Prints per target: inputs, largest input, the peak RSS of a run on one empty input (the binary, its
# embedded models and libFuzzer) and the peak RSS over the corpus.
#
#   bash tools/fuzz_rss.sh [TARGET...]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT/fuzz"
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(model_file npy capi_load_buffer png idx mnist_json cli_specs)
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
# its own target directory: the sanitizer builds of tools/fuzz.sh stay as they are
cargo +nightly fuzz build -s none --target-dir "$ROOT/fuzz/target/nosan" >/dev/null 2>&1
BIN="$ROOT/fuzz/target/nosan/x86_64-unknown-linux-gnu/release"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
: > "$TMP/empty"
printf "| target | inputs | largest input (bytes) | RSS on an empty input (MB) | peak RSS over the corpus (MB) | peak minus empty (MB) |\n|---|---|---|---|---|---|\n"
for t in "${TARGETS[@]}"; do
  mkdir -p "corpus/$t"
  base=$(/usr/bin/time -f %M "$BIN/$t" "$TMP/empty" 2>&1 >/dev/null | tail -1)
  find "corpus/$t" "seeds/$t" -type f > "$TMP/list"
  n=$(wc -l < "$TMP/list")
  largest=$(xargs -a "$TMP/list" stat -c %s | sort -n | tail -1)
  peak=0
  split -l 200 "$TMP/list" "$TMP/batch."
  for b in "$TMP"/batch.*; do
    r=$(xargs -a "$b" /usr/bin/time -f %M "$BIN/$t" 2>&1 >/dev/null | tail -1)
    [ "$r" -gt "$peak" ] && peak=$r
  done
  rm -f "$TMP"/batch.*
  awk -v t="$t" -v n="$n" -v l="$largest" -v b="$base" -v p="$peak" \
    'BEGIN { printf "| %s | %d | %d | %.1f | %.1f | %.1f |\n", t, n, l, b / 1024, p / 1024, (p - b) / 1024 }'
done
