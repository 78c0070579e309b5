#!/usr/bin/env bash
# The CPU backend as a CPU without vector kernels builds it: a copy of the working tree in which
# jointdiff-cpu's `target_arch = "x86_64"` conditions read `aarch64`, so that, built here on x86-64, every x86
# path (and the aarch64 NEON one) is compiled out and the backend takes its portable im2col + GEMM path;
# clippy and the crate's tests there. aarch64 itself, NEON kernel included, is tools/check_aarch64.sh.
#
#   bash tools/check_portable.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
(cd "$ROOT" && git ls-files -z | tar --null --ignore-failed-read -T - -cf -) | tar -x -C "$TMP"
sed -i 's/target_arch = "x86_64"/target_arch = "aarch64"/g' "$TMP"/backends/cpu/src/*.rs
if grep -q 'target_arch = "x86_64"' "$TMP"/backends/cpu/src/*.rs; then
  echo "check_portable: an x86-64 condition was left in" >&2
  exit 1
fi
export CARGO_TARGET_DIR="$ROOT/target/portable"
cd "$TMP"
cargo clippy -q -p jointdiff-cpu --all-targets -- -D warnings
cargo test -q -p jointdiff-cpu
echo "check_portable: jointdiff-cpu without its x86-64 kernels: clippy clean, tests passed"
