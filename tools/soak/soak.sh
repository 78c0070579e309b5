#!/usr/bin/env bash
# Long-run check of the C library (not part of CI): load, denoise and destroy CYCLES times in one process and
# print the resident memory every REPORT cycles.
#
#   bash tools/soak/soak.sh [CYCLES] [REPORT] [STEPS]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
CYCLES="${1:-10000}"; REPORT="${2:-1000}"; STEPS="${3:-2}"
cargo build --release -q -p jointdiff-capi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
gcc -O2 -std=c11 -D_POSIX_C_SOURCE=200809L tools/soak/soak.c -Ifrontends/capi/include \
  target/release/libjointdiff.a -lpthread -ldl -lm -o "$TMP/soak"
echo "machine: nproc $(nproc), $(lscpu | sed -n 's/^Model name: *//p' | head -1)"
/usr/bin/time -f "wall %e s, peak RSS %M kB" "$TMP/soak" fixtures/golden/ncsnv2_28x28x1_ngf16.safetensors \
  "$CYCLES" "$REPORT" "$STEPS"
