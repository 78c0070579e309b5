#!/usr/bin/env bash
# The evaluation of docs/results.md: `jointdiff demo` on the 200 held-out pairs in chunks of 50 (resumable:
# finished chunks are kept), then one table over all pairs.
#
#   tools/docs/eval_demo.sh OUTDIR [demo options...]
#   e.g. tools/docs/eval_demo.sh eval-projection --samples 4 --steps 100 --lambda 1 --mu 1
# CHUNKS="0 50" runs only those chunks (two single-thread runs side by side use 2 cores better than one
# 2-thread run: RAYON_NUM_THREADS=1 CHUNKS="0 50" ... & RAYON_NUM_THREADS=1 CHUNKS="100 150" ...).
set -euo pipefail
out=$1; shift
mkdir -p "$out"
jd=${JOINTDIFF:-target/release/jointdiff}
[ -x "$jd" ] || cargo build --release -p jointdiff-cli
for s in ${CHUNKS:-0 50 100 150}; do
  [ -f "$out/pairs_$s.csv" ] && continue
  "$jd" --quiet demo --start "$s" --count 50 "$@" --csv "$out/pairs_$s.csv.tmp" --out "$out/demo_$s.png" \
    > "$out/table_$s.txt"
  mv "$out/pairs_$s.csv.tmp" "$out/pairs_$s.csv"
done
for s in 0 50 100 150; do [ -f "$out/pairs_$s.csv" ] || exit 0; done
python3 "$(dirname "$0")/summarize_demo.py" "$out"/pairs_{0,50,100,150}.csv
