#!/usr/bin/env bash
# The fast-CPU issue's end-to-end figure: a 600-step joint denoise of one 28x28 image with the two embedded
# ngf-32 models (projection rule, y = 0.5 x + 0.5 n), timed with GNU time (`time -v`, Debian package
# `time`): wall time and peak RSS, RUNS runs with 2 threads and one with 1 thread, which must give the same
# bits. Not part of CI.
#
#   bash tools/bench/denoise600.sh [RUNS] [BINARY]
#
# The measurement is the first held-out Fashion-MNIST image blended with the first held-out digit, made
# with `jointdiff corrupt` from one-image slices of the fixtures (cut with the Python standard library).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
RUNS="${1:-3}"
JD="${2:-}"
if [ -z "$JD" ]; then
  cargo build --release -q -p jointdiff-cli
  JD="$ROOT/target/release/jointdiff"
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
first_image() {
  python3 - "$1" "$2" <<'PY'
import ast, sys
src, dst = sys.argv[1:3]
d = open(src, "rb").read()
hl = int.from_bytes(d[8:10], "little")
hdr = ast.literal_eval(d[10:10 + hl].decode("latin1"))
assert hdr["descr"] == "<f4" and not hdr["fortran_order"]
shape = (1,) + tuple(hdr["shape"][1:])
n = 4
for s in shape:
    n *= s
h = repr({"descr": "<f4", "fortran_order": False, "shape": shape}).encode()
h += b" " * ((64 - (10 + len(h) + 1) % 64) % 64) + b"\n"
open(dst, "wb").write(b"\x93NUMPY\x01\x00" + len(h).to_bytes(2, "little") + h + d[10 + hl:10 + hl + n])
PY
}
first_image fixtures/data/fashion_t10k_16.npy "$TMP/x.npy"
first_image fixtures/data/digits_heldout_16.npy "$TMP/n.npy"
"$JD" corrupt --signal "$TMP/x.npy" --noise-data "$TMP/n.npy" --operator scale:0.5 --alpha 0.5 \
  --out "$TMP/y.npy" --quiet
run() {
  RAYON_NUM_THREADS="$1" /usr/bin/time -v "$JD" denoise --measurement "$TMP/y.npy" --operator scale:0.5 \
    --alpha 0.5 --rule projection --steps 600 --seed 0 --out "$TMP/out$1.npy" --quiet 2>&1 |
    sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): \(.*\)/\1/p; s/.*Maximum resident set size (kbytes): \(.*\)/\1/p' |
    paste -sd' ' | awk -v t="$1" '{printf "threads=%s wall %s peak RSS %.1f MB\n", t, $1, $2 / 1024}'
}
echo "machine: nproc $(nproc), $(lscpu | sed -n 's/^Model name: *//p' | head -1)"
for _ in $(seq "$RUNS"); do run 2; done
run 1
cmp "$TMP/out1.npy" "$TMP/out2.npy" && echo "1 and 2 threads: identical output"
