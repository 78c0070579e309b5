#!/usr/bin/env bash
# Builds the C library with AddressSanitizer (nightly rustc, -Zsanitizer=address) and the C test program
# tests/capi/test_capi.c with gcc's AddressSanitizer and UndefinedBehaviorSanitizer, then runs the test program
# (every error path, cancellation, two threads sharing a model, a denoise; GPU part included unless
# JD_TEST_SKIP_GPU=1) and the soak program for CYCLES cycles. Any sanitizer report, leak included, fails.
# Not part of CI (it needs the nightly toolchain); issue 15 item 6.
#
#   bash tools/sanitize/capi.sh [CYCLES]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
CYCLES="${1:-200}"
TRIPLE=x86_64-unknown-linux-gnu
TARGET_DIR="$ROOT/target/asan"
# --target keeps the sanitizer flags off build scripts and proc macros
RUSTFLAGS="-Zsanitizer=address" cargo +nightly build -q --release --target "$TRIPLE" \
  --target-dir "$TARGET_DIR" -p jointdiff-capi
LIB="$TARGET_DIR/$TRIPLE/release/libjointdiff.a"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
CFLAGS=(-std=c11 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -Werror -O1 -g -fno-omit-frame-pointer
  -fsanitize=address,undefined -fno-sanitize-recover=all)
gcc "${CFLAGS[@]}" tests/capi/test_capi.c -Ifrontends/capi/include "$LIB" -lpthread -ldl -lm -o "$TMP/test_capi"
gcc "${CFLAGS[@]}" tools/soak/soak.c -Ifrontends/capi/include "$LIB" -lpthread -ldl -lm -o "$TMP/soak"
# the C test's measurement: 0.5 x + 0.5 n of two golden inputs and two held-out digits, as raw float32
python3 - "$TMP/y.raw" <<'PY'
import ast, struct, sys
def npy(path):
    b = open(path, "rb").read()
    hl = struct.unpack("<H", b[8:10])[0]
    h = ast.literal_eval(b[10:10 + hl].decode())
    assert h["descr"] == "<f4" and not h["fortran_order"]
    return struct.unpack("<%df" % (len(b[10 + hl:]) // 4), b[10 + hl:])
x = npy("fixtures/golden/ncsnv2_28x28x1_ngf16_input.npy")
n = npy("fixtures/data/digits_heldout_16.npy")
y = [0.5 * x[i] + 0.5 * n[i] for i in range(2 * 784)]
open(sys.argv[1], "wb").write(struct.pack("<%df" % len(y), *y))
PY
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:halt_on_error=1:detect_stack_use_after_return=1:strict_string_checks=1"
export LSAN_OPTIONS="suppressions=$ROOT/tools/sanitize/lsan.supp:print_suppressions=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
MODEL=fixtures/golden/ncsnv2_28x28x1_ngf16.safetensors
echo "== test_capi under ASan + UBSan"
"$TMP/test_capi" "$MODEL" 16 "$TMP/y.raw" 2 1 28 28 5 "$TMP/sig.raw" "$TMP/noi.raw" 2>&1 | tail -12
echo "== soak, $CYCLES cycles, under ASan + UBSan"
"$TMP/soak" "$MODEL" "$CYCLES" "$(( CYCLES / 4 > 0 ? CYCLES / 4 : 1 ))" 2 2>&1 | tail -6
echo "sanitizers: clean"
